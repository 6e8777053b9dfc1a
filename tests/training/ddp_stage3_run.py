"""Stage 3 under DDP on the CPU (gloo, 2 processes); launched by tests/training/test_ddp.py.

Lightning's DDP launcher starts rank 1 by re-running this script. Each rank writes its teacher's
weights and bank ids after training; rank 0 writes the final checkpoint (whose bank index is the
union of the ranks'; the entries are files in the shared bank folder).
"""
import sys
from pathlib import Path

import lightning as L
import torch

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.iqa.presets import ensemble_from_specs, preset_specs
from qualiteacher.training.stage3 import QualiTeacherModule


class DumpTeacher(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.teacher.state_dict(), self.out / f"teacher_rank{trainer.global_rank}.pt")
        torch.save(sorted(pl_module.bank.entries), self.out / f"bank_ids_rank{trainer.global_rank}.pt")


def main(demo: Path, out: Path) -> None:
    L.seed_everything(0)
    specs = [s for s in preset_specs("offline", "dehaze") if s.name != "niqe"]
    module = QualiTeacherModule(preset="tiny", ensemble=ensemble_from_specs(specs, task="dehaze"),
                                pref_start_step=1, crop_start_step=1, mask_block=16, ema_decay=0.9,
                                views=("identity", "hflip"), n_aug_variants=1, bank_dir=str(out / "bank"))
    data = RestorationDataModule(labeled_root=str(demo / "dehaze" / "labeled"),
                                 unlabeled_root=str(demo / "dehaze" / "unlabeled"), crop_size=32, batch_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DumpTeacher(out)], default_root_dir=str(out))
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(out / "final.ckpt")  # every rank calls it: the ranks' indexes are merged


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
