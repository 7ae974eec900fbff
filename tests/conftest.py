import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Keep diffusers' dynamic-module cache and the trackers' files inside the test's temporary folder."""
    cache = tmp_path_factory.mktemp("hf_modules")
    os.environ["HF_MODULES_CACHE"] = str(cache)
    os.environ["MEMDISTILL_CACHE"] = str(tmp_path_factory.mktemp("memdistill_cache"))  # audits' feature caches
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_unet(resolution=8, channels=1, num_classes=0, seed=0):
    from diffusers_memdistill.models.presets import build_unet

    torch.manual_seed(seed)
    return build_unet("tiny", resolution, channels, num_classes)


def save_teacher_and_student(root):
    """A tiny EDM teacher (4 Heun steps) and consistency student saved under ``root``, each with the training-set
    record of 20 digits; returns their two folders."""
    from diffusers_memdistill.data import build_training_set
    from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
    from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
    from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
    from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler

    training_set = build_training_set("digits", 8, num_train_images=20)
    EDMPipeline(tiny_unet(seed=0), EDMHeunScheduler(num_inference_steps=4)).save_pretrained(root / "teacher")
    ConsistencyStudentPipeline(tiny_unet(seed=1), ConsistencyStudentScheduler()).save_pretrained(root / "student")
    for name in ("teacher", "student"):
        training_set.save(root / name)
    return root / "teacher", root / "student"


def run_without_package(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run Python code in a subprocess where `import diffusers_memdistill` fails, as on a machine without it."""
    prelude = "import sys; sys.modules['diffusers_memdistill'] = None\n"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules_subprocess")}
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def launch_two_processes(name: str, argv: list) -> subprocess.CompletedProcess:
    """Run ``training_scripts/<name>.py`` under ``accelerate launch`` with two CPU processes (DDP over gloo; the
    script's flags should include ``--cpu``); fails the test with the end of stderr when it does not succeed."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "training_scripts" / f"{name}.py"), *[str(a) for a in argv]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_script(name: str, argv: list):
    """Run a training script's main() in this process (faster than a subprocess)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "training_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(module.parse_args([str(a) for a in argv]))


def write_pairs(root, n, prefix, seed, uncaptioned=(), broken=()):
    """An imagefolder root/train/*.png with a metadata.jsonl of captions."""
    folder = root / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            name = f"{i:03d}.png"
            if i in broken:
                (folder / name).write_bytes(b"not an image")
            else:
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": "" if i in uncaptioned else f"{prefix} {i}"}) + "\n")
    return root


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny EDM teacher of the distillation scripts' tests (2 steps on 40 digits at 8 px); read-only."""
    out = tmp_path_factory.mktemp("teacher")
    run_script("train_edm_teacher", [
        "--dataset_name", "digits", "--resolution", "8", "--num_train_images", "40", "--model_preset", "tiny",
        "--max_train_steps", "2", "--train_batch_size", "8", "--num_validation_images", "0", "--report_to", "none",
        "--output_dir", out,
    ])
    return out


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory):
    """Tiny offline Stable Diffusion components (``base``), 6 captioned pairs (``mem``) and a "fine-tuned" teacher: the
    base model with the records of the mix it was trained on beside it (``teacher``); read-only."""
    from diffusers_memdistill.captioned_data import build_memorization_mix, part_records
    from diffusers_memdistill.models.tiny_sd import save_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd_teacher")
    base = save_tiny_sd_pipeline(str(root / "base"), resolution=16)
    mem = write_pairs(root / "mem", 6, "a memorized photo number", 0)
    teacher = root / "teacher"
    shutil.copytree(base, teacher)
    mix = build_memorization_mix(str(mem), 3, 2, 16, cache_dir=str(root / "cache"))
    for name, record in part_records(mix).items():
        (teacher / name).write_text(json.dumps(record))
    return {"base": base, "mem": mem, "teacher": teacher, "cache": root / "cache"}
