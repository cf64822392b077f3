"""``torchrun --nproc_per_node=2`` (gloo, CPU): two DDP steps with gradient accumulation; both ranks end with
identical weights, and the CLI runs end to end under torchrun."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import torch

from var.hub import load_pretrained

WORKER = textwrap.dedent("""
    import os, sys, torch
    from var.models import create
    from var.train.data import ProceduralShapes
    from var.train.objectives import VARObjective
    from var.train.trainer import TrainConfig, Trainer
    out, fsdp, steps = sys.argv[1], sys.argv[2] == "fsdp", int(sys.argv[3])
    torch.manual_seed(0)
    tok = create("msvq_tiny").eval()
    model = create("var_tiny", drop_path_rate=0.1)
    trainer = Trainer(model, VARObjective(tok, seed=0), ProceduralShapes(64, image_size=16),
                      TrainConfig(out_dir=out, steps=steps, batch_size=4, grad_accum=2, lr=1e-2, ckpt_every=2,
                                  progress=False, ema_decay=0.5, fsdp=fsdp, resume="auto"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    rank = int(os.environ["RANK"])
    if not fsdp:
        torch.save({"final": model.state_dict(), "before": before, "ema": trainer.ema.shadow}, f"{out}/rank{rank}.pt")
    trainer.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_ranks_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _torchrun([str(script), str(tmp_path), "ddp", "2"], tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    changed = False
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), k
        changed |= not torch.equal(v, r0["before"][k])
    assert changed
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
    ckpt = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert ckpt["step"] == 2 and ckpt["loss"] > 0
    assert (tmp_path / "ckpt_00000002.pt").exists() and not (tmp_path / "rank1_metrics.csv").exists()


def test_fsdp_two_ranks_checkpoint_and_resume(tmp_path):
    from var.models import create
    from var.train.checkpoint import load_checkpoint
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _torchrun([str(script), str(tmp_path), "fsdp", "2"], tmp_path)
    state = load_checkpoint(tmp_path / "ckpt_00000002.pt")
    assert set(state["model"]) == set(create("var_tiny").state_dict())  # full (gathered) state dict
    _torchrun([str(script), str(tmp_path), "fsdp", "4"], tmp_path)  # resumes at step 2
    assert load_checkpoint(tmp_path / "ckpt_00000004.pt")["step"] == 4


def test_cli_tokenizer_then_var_under_torchrun(tmp_path):
    tiny_tok = ["--image-size", "16", "--num-images", "64", "--vocab-size", "32", "--z-channels", "8", "--ch", "16",
                "--ch-mult", "1", "2", "2", "--patch-nums", "1", "2", "4", "--steps", "2", "--batch-size", "4",
                "--no-progress"]
    _torchrun(["-m", "var.cli.train", "tokenizer-ms", *tiny_tok, "--out-dir", str(tmp_path / "tok")], tmp_path)
    tok = load_pretrained(tmp_path / "tok" / "model")
    assert tok.patch_nums == (1, 2, 4) and tok.vocab_size == 32
    from var.cli.train import main
    main(["var", "--tokenizer", str(tmp_path / "tok" / "model"), "--image-size", "16", "--num-images", "32",
          "--depth", "1", "--width", "32", "--num-heads", "2", "--steps", "2", "--batch-size", "4", "--no-progress",
          "--out-dir", str(tmp_path / "var"), "--export-dir", str(tmp_path / "bundle")])
    from var.hub import load_var
    tok2, model = load_var(tmp_path / "bundle" / "tokenizer", tmp_path / "bundle" / "transformer")
    assert model.config.depth == 1 and model.config.vocab_size == 32 and tok2.patch_nums == (1, 2, 4)
