"""The precision a run computes in: chosen for the machine (bfloat16 autocast with channels_last on a CPU with
native bfloat16, float32 on other CPUs, the recipe's on a GPU), overridden by --precision, said in the run's
first line, recorded in the checkpoint, and chosen again by a resume on another machine. The CPU's capability is
patched, so that these tests do not depend on the processor they run on."""
import pytest
import torch

import noah
import train
from data import UserError
from helpers import last_checkpoint, small_run, weights

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def choice(monkeypatch, found, *flags, device=CPU):
    """(autocast dtype, memory format, why) for the flags, on a CPU whose native bfloat16 is `found`."""
    monkeypatch.setattr(train, "native_bfloat16", lambda: found)
    monkeypatch.delenv(train.FLOAT16_ON_CPU, raising=False)
    return train.choose_precision(train.parse_args(list(flags)), device)


@pytest.mark.parametrize("found", ["AMX", "AVX512-BF16"])
def test_a_cpu_with_native_bfloat16_trains_in_bfloat16_with_channels_last(monkeypatch, found):
    dtype, layout, why = choice(monkeypatch, found)
    assert dtype == torch.bfloat16 and layout == torch.channels_last and why.startswith(f"this CPU has {found}")


def test_a_cpu_without_native_bfloat16_trains_in_float32(monkeypatch):
    dtype, layout, why = choice(monkeypatch, None)
    assert dtype is None and layout == torch.contiguous_format and "no native bfloat16" in why


def test_native_bfloat16_reads_pytorchs_checks_of_the_cpu(monkeypatch):
    for amx, avx512_bf16, expected in ((True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda found=avx512_bf16: found)
        assert train.native_bfloat16() == expected


def test_the_flags_override_the_machines_choice(monkeypatch):
    assert choice(monkeypatch, "AMX", "--precision", "float32")[:2] == (None, torch.contiguous_format)
    assert choice(monkeypatch, "AMX", "--no-channels-last")[:2] == (torch.bfloat16, torch.contiguous_format)
    assert choice(monkeypatch, None, "--precision", "bfloat16")[:2] == (torch.bfloat16, torch.channels_last)
    assert choice(monkeypatch, None, "--use_amp", "--amp-dtype", "bfloat16")[0] == torch.bfloat16
    assert choice(monkeypatch, None, "--precision", "float32", "--channels-last")[:2] == (None, torch.channels_last)


def test_float16_is_for_gpus(monkeypatch):
    """--use_amp (float16, the DeiT recipe's) keeps float16 on a GPU; on a CPU the machine's choice is made in its
    place, and naming float16 there is an error that says what to give instead."""
    assert choice(monkeypatch, None, "--use_amp", device=GPU)[:2] == (torch.float16, torch.contiguous_format)
    assert choice(monkeypatch, None, "--preset", "noah_deit_tiny_patch16_224", device=GPU)[0] == torch.float16
    assert choice(monkeypatch, None, "--preset", "noah_resnet18", device=GPU)[0] is None  # the CNN recipes: float32
    dtype, _, why = choice(monkeypatch, "AMX", "--use_amp")
    assert dtype == torch.bfloat16 and "float16 is for GPUs" in why
    assert choice(monkeypatch, None, "--use_amp")[0] is None
    with pytest.raises(UserError, match="--precision float16: float16 autocast is for GPUs; on a CPU give bfloat16"):
        choice(monkeypatch, "AMX", "--precision", "float16")


def run_in_process(monkeypatch, capsys, found, args):
    """train.main on a CPU reported with native bfloat16 `found` -> the lines it printed."""
    monkeypatch.setattr(train, "native_bfloat16", lambda: found)
    train.main([str(a) for a in args])
    return capsys.readouterr().out.splitlines()


def test_the_first_line_names_the_precision_and_a_resume_chooses_again_on_its_machine(image_folder, tmp_path,
                                                                                         monkeypatch, capsys):
    lines = run_in_process(monkeypatch, capsys, "AMX", small_run(image_folder, tmp_path))
    assert lines[0] == "bfloat16 autocast, channels_last: this CPU has AMX (--precision float32 for float32)"
    assert last_checkpoint(tmp_path)["precision"] == "bfloat16 autocast, channels_last"
    assert last_checkpoint(tmp_path)["args"]["precision"] == "auto"
    resumed = ["--resume", tmp_path / "checkpoint.pth.tar", "--epochs", 2, "--workers", 0]
    lines = run_in_process(monkeypatch, capsys, None, resumed)  # another machine: no native bfloat16
    assert lines[0] == "float32: this CPU has no native bfloat16 (AMX or AVX512-BF16)"
    changed = "epoch 1, the checkpoint's last, ran in bfloat16 autocast, channels_last; the run continues in float32"
    assert changed in lines
    assert last_checkpoint(tmp_path)["epoch"] == 2 and last_checkpoint(tmp_path)["precision"] == "float32"


def test_a_named_precision_stays_with_the_run_when_it_resumes(image_folder, tmp_path, monkeypatch, capsys):
    run_in_process(monkeypatch, capsys, "AMX", small_run(image_folder, tmp_path, "--precision", "float32"))
    assert last_checkpoint(tmp_path)["precision"] == "float32"
    resumed = ["--resume", tmp_path / "checkpoint.pth.tar", "--epochs", 2, "--workers", 0]
    lines = run_in_process(monkeypatch, capsys, "AMX", resumed)
    assert lines[0] == "float32: --precision float32 asks for it"
    assert last_checkpoint(tmp_path)["precision"] == "float32"
    lines = run_in_process(monkeypatch, capsys, "AMX", resumed[:3] + [3, "--workers", 0, "--precision", "auto"])
    assert lines[0].startswith("bfloat16 autocast, channels_last")
    assert "--precision auto overrides the resumed run's float32" in lines


def test_a_resumed_bfloat16_run_continues_exactly(image_folder, tmp_path, monkeypatch, capsys):
    common = ["--precision", "bfloat16", "--dropout", 0.3]
    run_in_process(monkeypatch, capsys, None, small_run(image_folder, tmp_path / "straight", *common, "--epochs", 2))
    run_in_process(monkeypatch, capsys, None, small_run(image_folder, tmp_path / "resumed", *common))
    run_in_process(monkeypatch, capsys, None, small_run(image_folder, tmp_path / "resumed", *common, "--epochs", 2,
                                                        "--resume", tmp_path / "resumed" / "checkpoint.pth.tar"))
    straight = weights(tmp_path / "straight" / "checkpoint.pth.tar")
    resumed = weights(tmp_path / "resumed" / "checkpoint.pth.tar")
    assert last_checkpoint(tmp_path / "resumed")["precision"] == "bfloat16 autocast, channels_last"
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_under_bfloat16_autocast_the_pocas_softmax_runs_in_float32_as_on_a_gpu():
    """CUDA's autocast runs softmax in float32; a CPU's would keep bfloat16 (maps summing to 1 to 2-3 digits)."""
    torch.manual_seed(0)
    head = noah.NOAH(512, 6, head_num=4, key_ratio=0.5)
    with torch.autocast("cpu", torch.bfloat16):
        logits, pocas, evidence = head(torch.randn(2, 512, 4, 4), maps=True)
    assert pocas.dtype == evidence.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(pocas.sum(dim=(-2, -1)), torch.ones(2, 4, 6), rtol=0, atol=1e-6)
