"""distill: the loss equals Hinton et al.'s formula; the teacher is frozen, in eval mode,
unwrapped and unchanged; a student distils from a teacher trained by the launcher itself."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.distill import distillation_loss
from tests.conftest import small_recipe


def test_loss_equals_the_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    task = F.cross_entropy(s, y)
    alpha, temp = 0.7, 3.0
    p_t = F.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * task
    assert torch.allclose(distillation_loss(s, t, task, alpha, temp), expected, atol=1e-6)
    # alpha = 0 is plain training; identical logits leave only the task term.
    assert torch.allclose(distillation_loss(s, t, task, 0.0, temp), task)
    assert torch.allclose(distillation_loss(s, s, task, 0.5, temp), 0.5 * task, atol=1e-6)


def test_student_distils_from_a_teacher_the_launcher_trained(digits, tmp_path):
    teacher_run = tmp_path / "teacher"
    train(validate_recipe(small_recipe(digits, teacher_run, model={"name": "wrn10_2", "num_classes": 10},
                                       train={"epochs": 1})))
    before = load_file(teacher_run / "final" / "model.safetensors")
    # alpha = 1: the student never sees a label, so all it learns comes from the teacher.
    raw = small_recipe(digits, tmp_path / "student", train={"epochs": 1},
                       plugins={"distill": {"checkpoint": str(teacher_run), "alpha": 1.0, "temperature": 2.0}})
    ctx = train(validate_recipe(raw))
    teacher = next(p for p in ctx.plugins if p.name == "distill").teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert type(teacher).__name__ == "WideResNet"  # not wrapped for DDP, and the run dir's model
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    teacher_top1 = [json.loads(x) for x in (teacher_run / "metrics.jsonl").read_text().splitlines()][-1]["val/top1"]
    assert rows[-1]["val/top1"] > 0.5 and teacher_top1 > 0.5  # chance is 0.1


def test_missing_teacher_is_explained_before_the_run_directory_exists(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", plugins={"distill": {"checkpoint": str(tmp_path / "nope")}})
    with pytest.raises(LauncherError, match="does not exist.*run directory of a finished teacher run"):
        train(validate_recipe(raw))
    assert not (tmp_path / "run").exists()
