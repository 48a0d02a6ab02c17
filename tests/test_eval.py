"""k-NN and linear evaluation, and the shared weight loader (utils "weights loading")."""
import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import eval_linear
import evaluation
import images
import utils
import vision_transformer as vits

SMALL_IMAGES = ["--resize_size", "28", "--crop_size", "28", "--num_workers", "0"]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _nano_backbone(seed: int) -> vits.VisionTransformer:
    torch.manual_seed(seed)
    return vits.vit_nano(patch_size=4, img_size=28)


def nano_backbone(seed: int = 0) -> vits.VisionTransformer:
    """A random vit_nano/4 for 28-px inputs; the same weights for the same seed (built
    once: timm's weight init is slow on a shared CPU)."""
    return copy.deepcopy(_nano_backbone(seed))


def training_checkpoint(teacher: nn.Module, student: nn.Module, ddp_prefix: bool = False) -> dict:
    """What main_massl.py saves: MultiCropWrapper state dicts plus plain-dict args."""
    def wrapped(backbone):
        state = vits.MultiCropWrapper(backbone, vits.MaSSLHead(backbone.embed_dim, 32, 64)).state_dict()
        return {("module." if ddp_prefix else "") + k: v for k, v in state.items()}
    return {"teacher": wrapped(teacher), "student": wrapped(student), "epoch": 3,
            "optimizer": {}, "memory": {"bank": torch.randn(64, 32), "ptr": torch.tensor(0)},
            "args": {"arch": "vit_nano", "patch_size": 4, "global_crops_size": 28, "lr": 5e-4}}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint of a random vit_nano/4 (teacher seed 0, student seed 1)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save(training_checkpoint(nano_backbone(0), nano_backbone(1)), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(repo_root: Path, script: str, *args, nproc: int = 1) -> subprocess.CompletedProcess:
    # One thread per process: the CPU is shared and 1- vs 2-process runs must compute alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(name, None)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                     f"--master-port={free_port()}"]
    return subprocess.run(launcher + [str(repo_root / script), *map(str, args)], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=240)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def run_in_process(repo_root: Path, script: str, *args) -> tuple[int, str, str]:
    """Run ``script`` as ``__main__`` in this process, saving the interpreter start-up of a
    subprocess: (exit code, stdout, stderr). An exception that escapes fails the test."""
    argv = [str(repo_root / script), *map(str, args)]
    old_argv, sys.argv = sys.argv, argv
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same arithmetic
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
        torch.set_num_threads(old_threads)
    return code, out.getvalue(), err.getvalue()


def assert_clean_exit(outcome: tuple[int, str, str], *fragments: str) -> None:
    """Exit code 2 and one 'error: ...' line naming ``fragments``."""
    code, _, err = outcome
    assert code == 2, err
    assert err.count("error: ") == 1, err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    for fragment in fragments:
        assert fragment in line, line


# --------------------------------------------------------------------------- k-NN classifier


def unit(*xs: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in xs))
    return [x / norm for x in xs]


def test_knn_weights_votes_by_exp_similarity_over_T():
    # Query e0. Its 3 nearest train features: one of class 0 at cosine 0.9, two of class 1
    # at cosine 0.5. With T=0.07 the single close neighbour outweighs the two far ones
    # (e^(0.9/0.07) > 2 e^(0.5/0.07)); with T=10 the weights are nearly equal and 2 beats 1.
    s = math.sqrt(0.75)
    train = torch.tensor([unit(0.9, math.sqrt(0.19), 0), [0.5, 0, s], [0.5, 0, -s], [-1, 0, 0]])
    train_labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0, 0], [-1.0, 0.1, 0]])
    query = F.normalize(query, dim=1)
    labels = torch.tensor([0, 2])
    top1, top5 = evaluation.knn_classifier(train, train_labels, query, labels, k=3, T=0.07, num_classes=3)
    assert top1 == 100.0 and top5 == 100.0
    top1, top5 = evaluation.knn_classifier(train, train_labels, query, labels, k=3, T=10.0, num_classes=3)
    # Both queries now go to class 1 (two nearly equal votes beat one), but each true
    # class got a vote, so it is within the top-3 of the 3 classes.
    assert top1 == 0.0 and top5 == 100.0
    # k=1: plain nearest neighbour.
    top1, top5 = evaluation.knn_classifier(train, train_labels, query, labels, k=1, T=0.07, num_classes=3)
    assert (top1, top5) == (100.0, 100.0)


def test_knn_top5_with_k_below_5_counts_only_classes_that_got_votes():
    # 7 classes, one train feature per class along its own axis.
    train = torch.eye(7)
    train_labels = torch.arange(7)
    # Query A: closest to class 3, then class 2, true label 2 -> top-1 miss, top-5 hit (k=2).
    # Query B: closest to class 4, then class 5, true label 0 -> class 0 got no vote: no hit,
    # even though class 0 would sort first among the zero-vote classes.
    queries = F.normalize(torch.tensor([[0, 0, 0.8, 1.0, 0, 0, 0], [0.01, 0, 0, 0, 1.0, 0.7, 0]]), dim=1)
    labels = torch.tensor([2, 0])
    knn = functools.partial(evaluation.knn_classifier, train, train_labels, queries, labels,
                            T=0.07, num_classes=7)
    top1, top5 = knn(k=2)
    assert (top1, top5) == (0.0, 50.0)
    top1, top5 = knn(k=1)
    assert (top1, top5) == (0.0, 0.0)
    # With k=7 every class gets a vote and class 0 (cosine 0.008) ranks 3rd for query B.
    top1, top5 = knn(k=7)
    assert (top1, top5) == (0.0, 100.0)


def test_knn_chunking_and_device_independent_result():
    gen = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(200, 16, generator=gen), dim=1)
    train_labels = torch.randint(0, 6, (200,), generator=gen)
    test = F.normalize(train[:37] + 0.3 * torch.randn(37, 16, generator=gen), dim=1)
    test_labels = train_labels[:37]
    whole = evaluation.knn_classifier(train, train_labels, test, test_labels, 10, 0.07, 6)
    for chunk in (1, 5, 36, 100):
        assert evaluation.knn_classifier(train, train_labels, test, test_labels, 10, 0.07, 6,
                                       chunk_size=chunk) == whole
    assert whole[0] > 60  # the queries are noisy copies of train features


def test_knn_rejects_k_outside_train_set():
    train = torch.eye(3)
    with pytest.raises(ValueError, match="k=4"):
        evaluation.knn_classifier(train, torch.arange(3), train, torch.arange(3), 4, 0.07, 3)


def test_effective_ks_clips_warns_and_deduplicates(capsys):
    assert evaluation.effective_ks([10, 20, 100, 200], 150) == [10, 20, 100, 150]
    assert "k=200" in capsys.readouterr().err
    assert evaluation.effective_ks([5, 300, 200], 100) == [5, 100]
    with pytest.raises(utils.UserError):
        evaluation.effective_ks([0], 10)


@pytest.mark.parametrize("num_items", [0, 1, 3, 10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_range_covers_every_item_once_in_order(num_items, world_size):
    shards = [evaluation.shard_range(num_items, r, world_size) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --------------------------------------------------------------------------- weight loader


def test_loader_round_trip_from_training_checkpoint(nano_checkpoint):
    teacher, student = nano_backbone(0), nano_backbone(1)
    model, dim, info = checkpoints.build_backbone_from_checkpoint(nano_checkpoint)
    assert (dim, info["arch"], info["patch_size"], info["img_size"]) == (128, "vit_nano", 4, 28)
    assert info["args"]["lr"] == 5e-4
    assert same_weights(model, teacher) and not same_weights(model, student)
    model.eval(), teacher.eval()
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(model(x), teacher(x))
    model, _, _ = checkpoints.build_backbone_from_checkpoint(nano_checkpoint, checkpoint_key="student")
    assert same_weights(model, student)
    fresh = nano_backbone(5)
    checkpoints.load_pretrained_weights(fresh, nano_checkpoint)
    assert same_weights(fresh, teacher)


def test_loader_strips_module_and_backbone_prefixes_and_drops_head(tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save(training_checkpoint(nano_backbone(0), nano_backbone(1), ddp_prefix=True), path)
    state, args = checkpoints.read_checkpoint_backbone(path)
    assert state.keys() == nano_backbone().state_dict().keys()
    assert not any(k.startswith(("module.", "backbone.", "head.")) for k in state)
    assert args["arch"] == "vit_nano"
    assert same_weights(checkpoints.build_backbone_from_checkpoint(path)[0], nano_backbone(0))


def test_loader_does_not_mangle_a_key_that_merely_contains_backbone(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 4)
            self.backbone = nn.Linear(4, 4)  # keys "backbone.weight" inside "encoder."
            self.head_proj = nn.Linear(4, 2)  # "head_proj" is not the projection head

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

    trained = Model()
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in trained.state_dict().items()}}
    ckpt["teacher"]["module.head.mlp.0.weight"] = torch.zeros(2, 2)
    torch.save(ckpt, tmp_path / "c.pth")
    state, _ = checkpoints.read_checkpoint_backbone(tmp_path / "c.pth")
    assert "encoder.backbone.weight" in state and "encoder.head_proj.weight" in state
    model = Model()
    checkpoints.load_pretrained_weights(model, tmp_path / "c.pth")
    assert same_weights(model, trained)


def test_loader_wrong_arch_or_patch_fails_loudly(nano_checkpoint):
    with pytest.raises(utils.UserError, match=r"missing keys.*shape mismatches.*--arch"):
        checkpoints.build_backbone_from_checkpoint(nano_checkpoint, arch="vit_tiny")
    with pytest.raises(utils.UserError, match=r"patch_embed\.proj\.weight"):
        checkpoints.build_backbone_from_checkpoint(nano_checkpoint, patch_size=8)
    model = vits.vit_nano(patch_size=8, img_size=56)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(utils.UserError, match="do not fit"):
        checkpoints.load_pretrained_weights(model, nano_checkpoint)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(utils.UserError, match="unknown --arch"):
        checkpoints.build_backbone_from_checkpoint(nano_checkpoint, arch="no_such_net")


def test_loader_missing_file_key_and_garbage(tmp_path, nano_checkpoint):
    with pytest.raises(utils.UserError, match="no such file"):
        checkpoints.read_checkpoint_backbone(tmp_path / "nope.pth")
    with pytest.raises(utils.UserError, match=r"no 'ema' entry.*teacher, student"):
        checkpoints.read_checkpoint_backbone(nano_checkpoint, checkpoint_key="ema")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(utils.UserError, match="cannot read checkpoint"):
        checkpoints.read_checkpoint_backbone(tmp_path / "junk.pth")


def test_loader_reads_dino_ibot_style_checkpoint_with_namespace_args(tmp_path):
    # DINO/iBOT store args as an argparse.Namespace, the student under DDP's "module.",
    # and iBOT's backbone has a training-only mask token.
    student = nano_backbone(3)
    state = {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
    state["module.backbone.masked_embed"] = torch.zeros(128)
    state["module.head.last_layer.weight_g"] = torch.ones(10, 1)
    ckpt = {"student": state, "teacher": {}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_nano", patch_size=4, global_crops_size=28)}
    torch.save(ckpt, tmp_path / "dino.pth")
    model, _, info = checkpoints.build_backbone_from_checkpoint(tmp_path / "dino.pth",
                                                          checkpoint_key="student")
    assert same_weights(model, student) and info["args"]["arch"] == "vit_nano"


def test_loader_bare_and_exported_files_infer_arch_and_grid(tmp_path):
    backbone = nano_backbone(4)
    torch.save(backbone.state_dict(), tmp_path / "bare.pth")
    torch.save({"model": backbone.state_dict()}, tmp_path / "model.pth")
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(backbone.state_dict(), str(tmp_path / "b.safetensors"),
                          metadata={"arch": json.dumps("vit_nano"), "patch_size": "4"})
    for name in ("bare.pth", "model.pth", "b.safetensors"):
        model, _, info = checkpoints.build_backbone_from_checkpoint(tmp_path / name)
        assert (info["arch"], info["patch_size"], info["img_size"]) == ("vit_nano", 4, 28), name
        assert same_weights(model, backbone), name
    # An explicit img_size with another grid resamples pos_embed once; other weights are unchanged.
    model, _, info = checkpoints.build_backbone_from_checkpoint(tmp_path / "bare.pth", img_size=56)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 128)
    assert torch.equal(model.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)


def test_loader_timm_backbone(tmp_path):
    net, _ = vits.build_backbone("test_resnet")
    torch.save(net.state_dict(), tmp_path / "r.pth")
    model, dim, _ = checkpoints.build_backbone_from_checkpoint(tmp_path / "r.pth", arch="test_resnet")
    assert dim == 96 and same_weights(model, net)


def test_user_error_message_unwraps_dataloader_worker_errors():
    wrapped = images.BadImageError("Caught BadImageError in DataLoader worker process 0.\n"
                                  "Original Traceback (most recent call last):\n  File ...\n"
                                  "images.BadImageError: cannot read image /d/x.png: broken")
    assert utils.user_error_message(wrapped) == "cannot read image /d/x.png: broken"
    assert utils.user_error_message(utils.UserError("plain")) == "plain"


# --------------------------------------------------------------------------- linear pieces


def test_frozen_features_concatenate_last_cls_tokens_and_patch_mean():
    backbone = nano_backbone().eval()
    x = torch.randn(2, 3, 28, 28)
    blocks = backbone.get_intermediate_layers(x, 4)
    features = eval_linear.FrozenFeatures(backbone, 4, False)
    assert features.feature_dim == 512
    assert torch.equal(features(x), torch.cat([b[:, 0] for b in blocks], dim=1))
    features = eval_linear.FrozenFeatures(backbone, 1, True)
    expected = torch.cat([blocks[-1][:, 0], blocks[-1][:, 1:].mean(1)], dim=1)
    assert features.feature_dim == 256 and torch.allclose(features(x), expected)
    assert torch.equal(features(x)[:, :128], backbone(x))  # the last CLS is the model output
    with pytest.raises(utils.UserError, match="n_last_blocks 7"):
        eval_linear.FrozenFeatures(backbone, 7, False)
    resnet, _ = vits.build_backbone("test_resnet")
    features = eval_linear.FrozenFeatures(resnet.eval(), 4, True)
    assert features(x).shape == (2, features.feature_dim) == (2, 96)


def test_linear_classifier_init():
    head = eval_linear.LinearClassifier(2000, 500)
    assert head.linear.bias.abs().sum() == 0
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)


# --------------------------------------------------------------------------- scripts end to end


def test_knn_script_end_to_end_and_features_round_trip(repo_root, fmnist_folder, nano_checkpoint,
                                                       tmp_path):
    out = tmp_path / "knn"
    result = run_script(repo_root, "eval_knn.py", "--data_path", fmnist_folder, "--pretrained_weights",
                        nano_checkpoint, *SMALL_IMAGES, "--nb_knn", "5", "20", "500",
                        "--batch_size_per_gpu", "50", "--output_dir", out, "--dump_features", out / "f")
    assert result.returncode == 0, result.stderr
    assert "k=500 is larger than the train set" in result.stderr
    assert "top-1" in result.stdout
    res = json.loads((out / "knn_results.json").read_text())
    assert [k for k in res if k.startswith("k=")] == ["k=5", "k=20", "k=300"]
    assert (res["num_train"], res["num_val"], res["num_classes"]) == (300, 100, 10)
    assert res["arch"] == "vit_nano"
    # Even a random ViT's features carry image structure: well above 10 % chance.
    assert res["k=20"]["top1"] > 15
    assert res["k=20"]["top5"] >= res["k=20"]["top1"]
    assert torch.load(out / "f" / "trainfeat.pth", weights_only=True).shape == (300, 128)

    code, _, err = run_in_process(repo_root, "eval_knn.py", "--load_features", out / "f",
                                  "--nb_knn", "5", "20", "500", "--output_dir", tmp_path / "knn_loaded")
    assert code == 0, err
    loaded = json.loads((tmp_path / "knn_loaded" / "knn_results.json").read_text())
    ks = [k for k in res if k.startswith("k=")]
    assert {k: loaded[k] for k in ks} == {k: res[k] for k in ks}


def test_knn_one_vs_two_processes_agree(repo_root, fmnist_folder, nano_checkpoint, tmp_path):
    common = ["--data_path", fmnist_folder, "--pretrained_weights", nano_checkpoint, *SMALL_IMAGES,
              "--nb_knn", "10", "20", "--batch_size_per_gpu", "50"]
    one = run_script(repo_root, "eval_knn.py", *common, "--output_dir", tmp_path / "one",
                     "--dump_features", tmp_path / "one")
    two = run_script(repo_root, "eval_knn.py", *common, "--output_dir", tmp_path / "two",
                     "--dump_features", tmp_path / "two", nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    res1 = json.loads((tmp_path / "one" / "knn_results.json").read_text())
    res2 = json.loads((tmp_path / "two" / "knn_results.json").read_text())
    assert res2.pop("world_size") == 2 and res1.pop("world_size") == 1
    assert res1 == res2
    for name in ("trainfeat.pth", "valfeat.pth", "trainlabels.pth"):
        a = torch.load(tmp_path / "one" / name, weights_only=True)
        b = torch.load(tmp_path / "two" / name, weights_only=True)
        assert torch.allclose(a, b, atol=1e-6), name  # same rows, same (dataset) order


def test_knn_tiny_val_with_fewer_classes_than_train(repo_root, fmnist_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fmnist_folder / "train", data / "train")
    picks = [("bag", 0), ("bag", 1), ("trouser", 0)]
    for cls, i in picks:
        (data / "val" / cls).mkdir(parents=True, exist_ok=True)
        src = sorted((fmnist_folder / "val" / cls).iterdir())[i]
        shutil.copy(src, data / "val" / cls / src.name)
    out = tmp_path / "out"
    code, _, err = run_in_process(repo_root, "eval_knn.py", "--data_path", data, "--arch", "vit_nano",
                                  "--patch_size", "4", *SMALL_IMAGES, "--output_dir", out,
                                  "--dump_features", out)
    assert code == 0, err
    assert "RANDOMLY INITIALISED" in err
    res = json.loads((out / "knn_results.json").read_text())
    assert res["num_val"] == 3 and res["num_classes"] == 10 and "k=200" in res
    train_classes = sorted(p.name for p in (data / "train").iterdir())
    val_labels = torch.load(out / "vallabels.pth", weights_only=True).tolist()
    assert val_labels == [train_classes.index("bag")] * 2 + [train_classes.index("trouser")]


def test_scripts_refuse_bad_input_cleanly(repo_root, fmnist_folder, nano_checkpoint, tmp_path):
    knn = ["--arch", "vit_nano", "--patch_size", "4", "--resize_size", "28", "--crop_size", "28",
           "--output_dir", tmp_path / "o"]
    missing = tmp_path / "missing"
    assert_clean_exit(run_in_process(repo_root, "eval_knn.py", "--data_path", missing, *knn),
                      "does not exist")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    assert_clean_exit(run_in_process(repo_root, "eval_knn.py", "--data_path", tmp_path / "empty", *knn),
                      "no images in", "cat")
    shutil.copytree(fmnist_folder / "train", tmp_path / "noval" / "train")
    noval = tmp_path / "noval"
    assert_clean_exit(run_in_process(repo_root, "eval_linear.py", "--data_path", noval, *knn),
                      "no folder", "val")
    broken = tmp_path / "broken"
    shutil.copytree(fmnist_folder, broken)
    first_class = sorted(p.name for p in (broken / "train").iterdir())[0]
    bad = broken / "train" / first_class / "0000_corrupt.png"  # first file read: fails at once
    bad.write_bytes(b"not a png")
    assert_clean_exit(run_in_process(repo_root, "eval_knn.py", "--data_path", broken, *knn,
                                     "--num_workers", "0"),
                      str(bad))
    linear = ["--data_path", fmnist_folder, "--resize_size", "28", "--crop_size", "28",
              "--output_dir", tmp_path / "o"]
    assert_clean_exit(run_in_process(repo_root, "eval_linear.py", *linear, "--pretrained_weights",
                                     nano_checkpoint, "--arch", "vit_tiny"),
                      "--arch", "vit_nano")
    assert_clean_exit(run_in_process(repo_root, "eval_linear.py", *linear, "--pretrained_weights",
                                     tmp_path / "nothing.pth"),
                      "no such file")
    assert_clean_exit(run_in_process(repo_root, "eval_knn.py", *linear, "--load_features", tmp_path),
                      "missing trainfeat.pth")
    # And once through a real interpreter, the error raised in a DataLoader worker process:
    # one line naming the file, no traceback on stderr, exit status 2.
    assert_clean_error(run_script(repo_root, "eval_knn.py", "--data_path", broken, *knn,
                                  "--num_workers", "1"),
                       str(bad))


def test_linear_script_trains_saves_resumes_and_evaluates(repo_root, fmnist_folder, nano_checkpoint,
                                                          tmp_path):
    out = tmp_path / "lin"
    common = ["--data_path", fmnist_folder, "--pretrained_weights", nano_checkpoint, *SMALL_IMAGES,
              "--batch_size_per_gpu", "32", "--lr", "0.1", "--output_dir", out]
    result = run_script(repo_root, "eval_linear.py", *common, "--epochs", "2", "--n_last_blocks", "2",
                        "--avgpool_patchtokens", "true")
    assert result.returncode == 0, result.stderr
    res = json.loads((out / "linear_results.json").read_text())
    assert (res["epoch"], res["feature_dim"], res["num_classes"]) == (2, 384, 10)
    assert not res["evaluate_only"]
    assert "RandomResizedCrop" in res["protocol"]
    last = torch.load(out / "linear_last.pth", weights_only=True)
    best = torch.load(out / "linear_best.pth", weights_only=True)
    assert last["epoch"] == 2 and last["head"]["linear.weight"].shape == (10, 384)
    assert isinstance(last["args"], dict) and last["settings"]["n_last_blocks"] == 2
    assert best["best_top1"] == res["best_top1"]
    assert len((out / "linear_log.txt").read_text().splitlines()) == 2

    # Same settings again: resumes after epoch 2, trains nothing more, reports the same head.
    code, stdout, err = run_in_process(repo_root, "eval_linear.py", *common, "--epochs", "2",
                                       "--n_last_blocks", "2", "--avgpool_patchtokens", "true")
    assert code == 0, err
    assert "resumed" in stdout and "epoch 3" not in stdout
    assert torch.equal(torch.load(out / "linear_last.pth", weights_only=True)["head"]["linear.weight"],
                       last["head"]["linear.weight"])
    # Other settings in the same folder: refused rather than mixed.
    assert_clean_exit(run_in_process(repo_root, "eval_linear.py", *common, "--epochs", "3"),
                      "another run", "epochs")

    # --evaluate: the saved best head's accuracy, without training (feature flags come from the head).
    code, _, err = run_in_process(repo_root, "eval_linear.py", *common, "--evaluate")
    assert code == 0, err
    res_ev = json.loads((out / "linear_results.json").read_text())
    assert res_ev["evaluate_only"] and res_ev["head_weights"].endswith("linear_best.pth")
    assert res_ev["top1"] == pytest.approx(best["best_top1"], abs=1e-3)


def test_linear_cached_features_learn_and_ddp_matches_single_process_eval(repo_root, fmnist_folder,
                                                                          nano_checkpoint, tmp_path):
    out = tmp_path / "cached"
    common = ["--data_path", fmnist_folder, "--pretrained_weights", nano_checkpoint, *SMALL_IMAGES,
              "--batch_size_per_gpu", "50", "--output_dir", out]
    two = run_script(repo_root, "eval_linear.py", *common, "--cache_features", "true", "--epochs", "8",
                     "--lr", "0.2", "--val_freq", "4", nproc=2)
    assert two.returncode == 0, two.stderr
    res = json.loads((out / "linear_results.json").read_text())
    assert res["world_size"] == 2 and "NOT the paper protocol" in res["protocol"]
    assert res["top1"] > 15  # the head learned something (chance is 10 %)
    # The same head evaluated by one process, on images rather than cached features.
    code, _, err = run_in_process(repo_root, "eval_linear.py", *common, "--evaluate", "--head_weights",
                                  out / "linear_last.pth")
    assert code == 0, err
    res_one = json.loads((out / "linear_results.json").read_text())
    assert (res_one["top1"], res_one["top5"]) == (res["top1"], res["top5"])
