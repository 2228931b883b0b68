-- Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d):
-- one database per service, both owned by the compose file's POSTGRES_USER.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
