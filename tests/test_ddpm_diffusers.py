"""ingest_ddpm with ``source: diffusers``: sample a tiny, locally built DDPM pipeline."""

import json

import numpy as np
import pytest



def build_tiny_ddpm(path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_diffusers_source_samples_and_labels(tiny_repro, tmp_path, monkeypatch, scheduler):
    import shutil

    import yaml
    from stages import ingest_ddpm

    for sub in ("data", "models"):
        shutil.copytree(tiny_repro / sub, tmp_path / sub)   # the session's tiny run: data, teacher
    model_dir = build_tiny_ddpm(tmp_path / "ddpm")
    params = yaml.safe_load((tiny_repro / "params.yaml").read_text())
    params["ddpm"].update(source="diffusers", num_images=5,
                          diffusers={"model_dir": str(model_dir), "scheduler": scheduler,
                                     "inference_steps": 2, "batch_size": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    ingest_ddpm.run([])
    report = {**json.loads((tmp_path / "metrics/ddpm.json").read_text()),
              **json.loads((tmp_path / "metrics/ddpm_info.json").read_text())}
    assert report["num_images"] == 5 and report["labelled_by"] == "teacher"
    images = np.load(tmp_path / "data/generated/images.npy")
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
