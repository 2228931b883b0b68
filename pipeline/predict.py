"""Predict the class of image files with the ONNX student in onnxruntime.

    robustkd-predict img1.png img2.jpg                       # models/student.onnx
    robustkd-predict --model models:/robustkd-student@champion img.png
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .onnx_student import OnnxStudent, load_image_file, resolve_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (any size; resized to 32x32)")
    p.add_argument("--model", default="models/student.onnx",
                   help="ONNX file or MLflow model URI (default: models/student.onnx)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    try:
        student = OnnxStudent(resolve_model(args.model))
        batch = np.stack([load_image_file(f) for f in args.images])
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for path, pred in zip(args.images, student.predict(batch)):
        if args.json:
            print(json.dumps({"file": path, **pred}))
        else:
            print(f"{path}\t{pred['class']}\t{pred['probability']:.3f}")


if __name__ == "__main__":
    main()
