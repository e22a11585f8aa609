"""`pakhsh dreambooth` then `pakhsh generate -m RUN` as a user meets them, on the tiny latent base of the latent
tests: the fine-tuned model (full, or base + LoRA adapters from RUN or RUN/lora) is what generate runs, the demo
subject is written into the run, prompts without the identifier get a notice, and every bad input is one line
(exit 2, no traceback) before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.cli import main
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline
from tests.conftest import run_cli
from tests.training.test_dreambooth import (  # noqa: F401 (fixtures: pytest finds them by name here)
    RUN_SETS,
    SIZE,
    TOKEN,
    _caption_cache,
    _one_thread,
    base,
    dreambooth_run,
    lora_run,
    subject,
)

PROMPT = f"a {TOKEN} star at the bottom right on a blue background"
PAD = 2  # save_grid's padding


def cli(*args: str) -> int:
    return main(["--threads", "1", *args])


def grid(path: Path) -> torch.Tensor:
    """The first image of a grid written with --scale 1, in [-1, 1]."""
    x = np.asarray(Image.open(path).convert("RGB"))[PAD:PAD + SIZE, PAD:PAD + SIZE]
    return torch.from_numpy(x.copy()).permute(2, 0, 1).float() / 127.5 - 1


def err_line(capsys, *args: str, needles: tuple[str, ...] = ()) -> str:
    code, err = run_cli(["--threads", "1", *args], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pakhsh dreambooth: error: ") or lines[0].startswith("pakhsh generate: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_generate_runs_the_fine_tuned_model(dreambooth_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    assert cli("generate", PROMPT, "-m", str(dreambooth_run), "--steps", "3", "--scale", "1", "-o", str(out),
               "-q") == 0
    pipe = TextToImagePipeline.from_pretrained(dreambooth_run, device="cpu")
    assert pipe.model.config.dreambooth.token == TOKEN
    want = pipe.generate([PROMPT], None, SampleSettings("ddim", 3, guidance=3.0), seed=0, progress=False)[0]
    assert (grid(out) - want).abs().max() <= 1.5 / 127.5  # the PNG rounds to 8 bits
    base_pipe = TextToImagePipeline.from_pretrained(pipe.model.config.dreambooth.base, device="cpu")
    other = base_pipe.generate([PROMPT], None, SampleSettings("ddim", 3, guidance=3.0), seed=0, progress=False)[0]
    assert (other - want).abs().max() > 0.01  # not the base's image


def test_lora_run_and_its_lora_folder_generate_the_same(lora_run: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "run.png", tmp_path / "lora.png"
    for model, out in ((lora_run, a), (lora_run / "lora", b)):
        assert cli("generate", PROMPT, "-m", str(model), "--steps", "3", "--scale", "1", "-o", str(out), "-q") == 0
    assert (grid(a) - grid(b)).abs().max() <= 1.5 / 127.5


def test_generate_notices_a_prompt_without_the_identifier(dreambooth_run: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="'a star on a red background' lacks the identifier 'zwx'"):
        assert cli("generate", "a star on a red background", "-m", str(dreambooth_run), "--steps", "2",
                   "-o", str(tmp_path / "g.png"), "-q") == 0


def test_demo_subject_is_written_into_the_run(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "demo"
    code = cli("dreambooth", "--subject", "demo", "-m", str(base), "--out", str(run), "--steps", "1",
               "--batch-size", "2", "--class-images", "2", "-q", *sum((["--set", s] for s in RUN_SETS), []))
    assert code == 0
    assert sorted(p.name for p in (run / "subject").glob("*.png")) == [f"subject_{i}.png" for i in range(4)]
    assert (run / "subject" / "subject_0.txt").read_text().strip() == "a sks star at the top left on a gray background"
    assert (run / "class_images.png").is_file() and (run / "samples" / "step_0000001.png").is_file()


def test_a_finished_run_is_not_trained_over(dreambooth_run: Path, base: Path, subject: Path, capsys) -> None:
    err_line(capsys, "dreambooth", "--subject", str(subject), "--class-noun", "star", "--token", TOKEN, "-m",
             str(base), "--out", str(dreambooth_run), "-q", needles=("already holds a run", "--resume"))


# ------------------------------------------------------------------------------------------------ bad inputs
def _unreadable(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return folder


@pytest.mark.parametrize("case", ["no_subject", "missing_folder", "empty_folder", "unreadable", "nested",
                                  "no_class_noun", "two_word_token", "token_is_noun", "instance_without_token",
                                  "prior_without_class_images", "pixel_base", "missing_base", "resume_and_overwrite",
                                  "resume_not_a_run", "token_known_to_base"])
def test_bad_inputs_are_one_line(case: str, base: Path, subject: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "run")
    std = ["--subject", str(subject), "--class-noun", "star", "--token", TOKEN, "-m", str(base), "--out", out, "-q"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "no_subject": lambda: ([a for a in std if a not in ("--subject", str(subject))], ("--subject is required",)),
        "missing_folder": lambda: (["--subject", str(tmp_path / "nope"), *std[2:]], ("no such folder",)),
        "empty_folder": lambda: (["--subject", str(empty), *std[2:]], ("no images",)),
        "unreadable": lambda: (["--subject", str(_unreadable(tmp_path / "u")), *std[2:]],
                               ("bad.png is not a readable image",)),
        "nested": lambda: (["--subject", str(subject.parent), *std[2:]], ("is in a subfolder",)),
        "no_class_noun": lambda: ([a for a in std if a not in ("--class-noun", "star")], ("--class-noun is required",)),
        "two_word_token": lambda: ([*std, "--token", "sks star"], ("--token 'sks star': must be one word",)),
        "token_is_noun": lambda: ([*std, "--token", "star"], ("is the class noun",)),
        "instance_without_token": lambda: ([*std, "--instance-prompt", "a star"], ("lacks the token",)),
        "prior_without_class_images": lambda: ([*std, "--class-images", "0"], ("needs at least 1 class image",)),
        "pixel_base": lambda: ([*std, "-m", "shapes"], ("is not a latent text-to-image model",)),
        "missing_base": lambda: ([*std, "-m", str(tmp_path / "nothing")], ("no such folder or shipped model",)),
        "resume_and_overwrite": lambda: ([*std, "--resume", "--overwrite"], ("use one of them",)),
        "resume_not_a_run": lambda: (["--out", out, "--resume", "-q"], ("--resume",)),
        "token_known_to_base": lambda: ([*std, "--token", "red", "--steps", "1"],
                                        ("--token red: the base was trained",)),
    }
    argv, needles = cases[case]()
    err_line(capsys, "dreambooth", *argv, needles=needles)
    assert not (tmp_path / "run" / "checkpoints").exists()
