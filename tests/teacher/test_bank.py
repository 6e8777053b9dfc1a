"""The disk-backed pseudo-label bank: content-addressed files, exact restore after a kill, garbage
collection that never deletes a referenced entry, and DDP ranks' indexes merged without pixels."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from qualiteacher.teacher import DiskStore, PseudoLabelBank, merge_indexes


def _offer_round(bank, ids, gen, lo=0.0, hi=1.0, size=8):
    n = len(ids)
    scores = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    return bank.offer_batch(ids, torch.rand(n, 3, size, size, generator=gen), torch.rand(n, 1, size, size, generator=gen),
                            scores, (scores * 8).long().clamp(max=7))


def test_disk_store_is_content_addressed_and_never_overwrites(tmp_path):
    store = DiskStore(tmp_path, cache_entries=0)
    pixels = torch.randint(0, 255, (4, 8, 8), dtype=torch.uint8).numpy()
    key = store.put("img-1", pixels)
    path = store.path(key)
    stamp = path.stat().st_mtime_ns
    assert store.put("img-1", pixels.copy()) == key and path.stat().st_mtime_ns == stamp
    assert store.put("img-2", pixels) != key                  # the id is part of the address
    assert torch.equal(store.get_batch([key])[0], torch.from_numpy(pixels))
    assert not list(tmp_path.rglob("*.tmp"))
    store.delete([key])
    with pytest.raises(FileNotFoundError, match="missing"):
        store.get_batch([key])


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_bank import _offer_round
    from qualiteacher.teacher import DiskStore, PseudoLabelBank

    root, ckpt = sys.argv[1], sys.argv[2]
    bank = PseudoLabelBank(3, DiskStore(root, cache_entries=4))
    gen = torch.Generator().manual_seed(0)
    ids = [f"img{{i}}" for i in range(6)]
    for _ in range(4):
        _offer_round(bank, ids, gen, hi=0.5)
    state = bank.state_dict()
    bank.mark_checkpoint()
    torch.save({{"bank": state, "gathered": bank.gather(ids)._asdict()}}, ckpt)
    bank.collect_garbage()                           # the checkpoint is on disk
    for _ in range(3):                               # better candidates push checkpointed entries out
        _offer_round(bank, ids, gen, lo=0.5)
    assert bank.pending, "nothing was pushed out"
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_restore_after_kill_is_exact(tmp_path):
    root, ckpt = tmp_path / "bank", tmp_path / "bank.ckpt"
    script = _KILLED_RUN.format(tests=os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", script, str(root), str(ckpt)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    saved = torch.load(ckpt, weights_only=True)
    bank = PseudoLabelBank(store=DiskStore(root))
    bank.load_state_dict(saved["bank"])
    assert bank.missing_entries() == []
    ids = [f"img{i}" for i in range(6)]
    got = bank.gather(ids)._asdict()
    assert all(torch.equal(got[k], saved["gathered"][k]) for k in got)
    # the killed run wrote entries the checkpoint never saw: they are files no index refers to
    assert len(DiskStore(root).keys_on_disk() - bank.live_keys()) > 0


@pytest.mark.parametrize("keep", [1, 2])
def test_collected_files_are_never_referenced_and_referenced_files_never_collected(tmp_path, keep):
    store = DiskStore(tmp_path, cache_entries=0)
    bank = PseudoLabelBank(2, store, keep_checkpoints=keep)
    gen = torch.Generator().manual_seed(1)
    checkpoints: list[set[str]] = []            # the index of every checkpoint written, oldest first
    collected_total = 0
    for step in range(40):
        ids = [f"img{int(i)}" for i in torch.randint(0, 10, (4,), generator=gen)]
        _offer_round(bank, ids, gen, lo=step / 80, hi=0.5 + step / 80)
        if step % 5 == 4:  # write a checkpoint, then collect once it is on disk
            checkpoints.append(bank.live_keys())
            bank.mark_checkpoint()
            files_before = store.keys_on_disk()
            collected = bank.collect_garbage()
            collected_total += collected
            gone = files_before - store.keys_on_disk()
            assert len(gone) == collected
            assert not gone & set().union(*checkpoints[-keep:]) and not gone & bank.live_keys()
        kept = set().union(*checkpoints[-keep:]) if checkpoints else set()
        files = store.keys_on_disk()
        assert kept <= files and bank.live_keys() <= files  # everything referenced exists
        assert files == kept | bank.live_keys() | set(bank.pending) | set().union(*bank.marked)
    assert collected_total > 0


def test_two_ranks_write_their_own_ids_and_their_indexes_merge(tmp_path):
    root = tmp_path / "bank"
    ranks = [PseudoLabelBank(2, DiskStore(root), keep_checkpoints=1) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    own = [["a", "b", "shared"], ["c", "d", "shared"]]   # "shared": a sampler's padded duplicate
    for bank, ids in zip(ranks, own):
        for _ in range(3):
            _offer_round(bank, ids, gen)
    written = [bank.live_keys() | set(bank.pending) for bank in ranks]
    assert not written[0] & written[1]                    # each rank wrote files for its ids only
    merged = merge_indexes([bank.index_state() for bank in ranks], k=2)
    assert set(merged) == {"a", "b", "c", "d", "shared"}
    both = ranks[0].entries["shared"] + ranks[1].entries["shared"]
    assert [e[0] for e in merged["shared"]] == sorted((e.score for e in both), reverse=True)[:2]
    for bank in ranks:                                    # every rank continues from the merged index
        bank.load_index_(merged)
        bank.mark_checkpoint()
    assert ranks[0].entries == ranks[1].entries
    ids = ["a", "b", "c", "d", "shared"]
    g0, g1 = ranks[0].gather(ids), ranks[1].gather(ids)   # rank 0 reads rank 1's files from the folder
    assert all(torch.equal(x, y) for x, y in zip(g0, g1))
    for bank in ranks:
        bank.collect_garbage()
    referenced = ranks[0].live_keys()
    assert referenced <= DiskStore(root).keys_on_disk()
    assert DiskStore(root).keys_on_disk() == referenced   # the "shared" loser's file was collected


def test_stage3_checkpoint_hooks_restore_the_bank_and_random_streams_exactly(tmp_path):
    from torch import nn

    from qualiteacher.training.stage3 import QualiTeacherModule

    def module():
        return QualiTeacherModule(preset="tiny", ensemble=nn.Identity(), bank_dir=str(tmp_path / "bank"), seed=3)

    trained = module()
    gen = torch.Generator().manual_seed(4)
    ids = [f"img{i}" for i in range(4)]
    for _ in range(3):
        _offer_round(trained.bank, ids, gen)
    torch.randint(10, (7,), generator=trained._gen)          # the run drew from its streams
    ckpt = {"state_dict": trained.state_dict(), "global_step": 5}
    trained.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "s3.ckpt")
    expected = (torch.randint(1000, (5,), generator=trained._gen), torch.rand(5), trained.bank.gather(ids))
    _offer_round(trained.bank, ids, gen, lo=1.0, hi=2.0)     # then it went on and was killed

    resumed = module()
    resumed.on_load_checkpoint(torch.load(tmp_path / "s3.ckpt", weights_only=True))
    assert torch.equal(torch.randint(1000, (5,), generator=resumed._gen), expected[0])
    assert torch.equal(torch.rand(5), expected[1])
    assert all(torch.equal(a, b) for a, b in zip(resumed.bank.gather(ids), expected[2]))
    assert resumed._resumed and resumed.bank.missing_entries() == []


def test_resume_with_a_lost_bank_folder_fails_clearly(tmp_path):
    from torch import nn

    from qualiteacher.training.stage3 import QualiTeacherModule

    trained = QualiTeacherModule(preset="tiny", ensemble=nn.Identity(), bank_dir=str(tmp_path / "bank"))
    _offer_round(trained.bank, ["a", "b"], torch.Generator().manual_seed(0))
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    moved = QualiTeacherModule(preset="tiny", ensemble=nn.Identity(), bank_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(RuntimeError, match="missing from bank_dir"):
        moved.on_load_checkpoint(ckpt)
