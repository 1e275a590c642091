"""GradSync over two real processes (gloo on 127.0.0.1): replicas start equal, gradients and
buffers are the mean over ranks, exactly as a single process computes it."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.train.grad_sync import GradSync
from tests.pipeline.toy_models import ToyAttention, loss_of, toy_images


def _grads_on(model, source, keys, labels, seed):
    model.zero_grad()
    views = source.view(keys, model.view_size)
    out = model(views, source.level0_sizes(keys), source, keys, torch.Generator().manual_seed(seed))
    loss_of(out, labels).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, port, result_dir):
    from models.memory import TensorPyramidSource

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images, labels = toy_images(8)
        source = TensorPyramidSource.from_images(images, coarsest=16)
        keys = sorted(images)
        shards = [(keys[:4], torch.tensor(labels[:4])), (keys[4:], torch.tensor(labels[4:]))]
        torch.manual_seed(rank)  # different initialisation on each rank
        model = ToyAttention()
        sync = GradSync(model)
        sync.broadcast_state()
        torch.manual_seed(0)
        reference = ToyAttention()  # rank 0's initialisation, built locally
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b), "broadcast did not give rank 0's weights"
        expected = [_grads_on(reference, source, *shards[r], seed=r) for r in range(2)]
        _grads_on(model, source, *shards[rank], seed=rank)
        sync.average_gradients()
        for k, p in model.named_parameters():
            mean = (expected[0][k] + expected[1][k]) / 2
            torch.testing.assert_close(p.grad, mean, msg=k)
        # the ranks' gradients differ, so a missing or wrong all-reduce would fail above
        assert not torch.allclose(expected[0]["head.weight"], expected[1]["head.weight"])
        model.baseline.fill_(float(rank + 1))
        sync.average_buffers()
        assert model.baseline.item() == 1.5
        torch.save({"ok": True}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gradients_and_buffers_are_averaged_across_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.pt").exists() and (tmp_path / "rank1.pt").exists()


def test_single_process_is_a_no_op():
    model = ToyAttention()
    model.attention.weight.grad = torch.ones_like(model.attention.weight)
    GradSync(model).average_gradients()
    assert torch.equal(model.attention.weight.grad, torch.ones_like(model.attention.weight))
