"""run_folder: which checkpoints a run resumes from, and the one-line refusals of the others."""
import pytest
import torch

import main_massl
import run_folder
import utils


def _checkpoint(path, **extra):
    ckpt = {key: {} for key in run_folder.CHECKPOINT_KEYS}
    ckpt.update(epoch=1, images_per_step=16, epoch_images_done=0, **extra)
    torch.save(ckpt, path)
    return path


def _args(*flags):
    return main_massl.build_cli_parser().parse_args(["--data_path", "x", *flags])


@pytest.mark.parametrize("saved_as", ["memory_size", "out_dim"])
def test_a_checkpoint_of_another_memory_size_is_refused_naming_the_flag(tmp_path, saved_as):
    """Args saved under the internal name or (before the rename) under the flag's name."""
    path = _checkpoint(tmp_path / "c.pth", args={saved_as: 32, "arch": "vit_small"})
    with pytest.raises(utils.UserError, match=r"trained with --out_dim 32, this run has --out_dim 64"):
        run_folder.load_checkpoint(path, _args("--out_dim", "64"))
    assert run_folder.load_checkpoint(path, _args("--out_dim", "32"))["epoch"] == 1


def test_a_checkpoint_without_the_resume_position_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({key: {} for key in ("student", "teacher", "optimizer", "memory", "epoch")}, path)
    with pytest.raises(utils.UserError,
                       match=r"not a MaSSL training checkpoint \(no images_per_step, epoch_images_done\)"):
        run_folder.load_checkpoint(path, _args())
