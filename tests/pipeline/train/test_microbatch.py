"""The micro-batch scheduler, with a fake source whose reads complete in a chosen order."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from models.memory import TensorPyramidSource
from models.protocol import drive
from pipeline.train.microbatch import run_microbatches, split_batch, submitter
from tests.pipeline.toy_models import ToyAttention, ViewOnly, loss_of, toy_images


class ScriptedSource:
    """Serves reads from ``inner`` but completes them only in ``order``: a list of
    (micro-batch index, read round) pairs; a completer thread resolves one every few ms."""

    def __init__(self, inner, key_to_mb, order):
        self.inner, self.key_to_mb, self.order = inner, key_to_mb, list(order)
        self.submitted: dict[tuple[int, int], tuple[Future, object, object]] = {}
        self.rounds: dict[int, int] = {}
        self.completed: list[tuple[int, int]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._complete, daemon=True)
        self.thread.start()

    def submit(self, keys, request):
        mb = self.key_to_mb[keys[0]]
        with self.cond:
            r = self.rounds.get(mb, 0)
            self.rounds[mb] = r + 1
            future: Future = Future()
            self.submitted[(mb, r)] = (future, keys, request)
            self.cond.notify_all()
        return future

    def _complete(self):
        for item in self.order:
            with self.cond:
                if not self.cond.wait_for(lambda item=item: item in self.submitted, timeout=10):
                    return
                future, keys, request = self.submitted[item]
            time.sleep(0.01)
            self.completed.append(item)
            future.set_result(self.inner.read(keys, request))


def _setup(n_scenes=6, parts=3, rounds=1, seed=0):
    images, labels = toy_images(n_scenes)
    source = TensorPyramidSource.from_images(images, coarsest=16)
    keys = sorted(images)
    torch.manual_seed(seed)
    model = ToyAttention(rounds=rounds)
    views = source.view(keys, model.view_size)
    sizes = source.level0_sizes(keys)
    y = torch.tensor(labels)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(parts)]
    micro = split_batch(keys, views, sizes, y, parts, gens)
    key_to_mb = {k: mb.index for mb in micro for k in mb.keys}
    return model, source, micro, key_to_mb


def _reference(model, source, micro):
    """Sequential drive() of each micro-batch with a fresh copy of its generator."""
    outs = {}
    for mb in micro:
        gen = torch.Generator().manual_seed(100 + mb.index)
        outs[mb.index] = drive(model.steps(mb.views, mb.sizes, gen), source, mb.keys)
    return outs


def test_split_batch_sizes_and_order():
    keys = [f"k{i}" for i in range(7)]
    micro = split_batch(keys, torch.zeros(7, 3, 2, 2), torch.zeros(7, 2), torch.arange(7), 3)
    assert [mb.keys for mb in micro] == [("k0", "k1"), ("k2", "k3", "k4"), ("k5", "k6")]
    assert torch.equal(torch.cat([mb.labels for mb in micro]), torch.arange(7))
    assert len(split_batch(keys[:2], torch.zeros(2, 3, 2, 2), torch.zeros(2, 2), torch.arange(2), 4)) == 2


@pytest.mark.parametrize("n, parts, sizes", [(6, 3, [1, 2, 3]), (12, 3, [2, 4, 6]), (7, 2, [2, 5]),
                                             (3, 3, [1, 1, 1]), (4, 3, [1, 1, 2])])
def test_ramp_split_grows_and_keeps_every_scene_in_order(n, parts, sizes):
    keys = [f"k{i}" for i in range(n)]
    micro = split_batch(keys, torch.zeros(n, 3, 2, 2), torch.zeros(n, 2), torch.arange(n), parts,
                        ramp=True)
    assert [len(mb.keys) for mb in micro] == sizes
    assert [k for mb in micro for k in mb.keys] == keys
    assert [mb.index for mb in micro] == list(range(len(sizes)))


@pytest.mark.parametrize("order", [[(2, 0), (0, 0), (1, 0)], [(0, 0), (1, 0), (2, 0)]])
def test_one_round_finishes_in_completion_order_with_reference_outputs(order):
    model, source, micro, key_to_mb = _setup()
    fake = ScriptedSource(source, key_to_mb, order)
    events = []

    def start(mb):
        events.append(("start", mb.index))
        return model.steps(mb.views, mb.sizes, mb.generator)

    outputs = {}

    def finish(mb, out):
        events.append(("finish", mb.index))
        outputs[mb.index] = out

    stats = run_microbatches(micro, start, fake.submit, finish)
    # every micro-batch drew its locations before any finished: one set of weights for all
    assert events[:3] == [("start", 0), ("start", 1), ("start", 2)]
    assert [e[1] for e in events[3:]] == [mb for mb, _ in order]
    assert stats.reads == 3 and stats.wait_s > 0
    reference = _reference(model, source, micro)
    for i, out in outputs.items():
        torch.testing.assert_close(out.logits, reference[i].logits)
        assert torch.equal(out.boxes, reference[i].boxes)


def test_two_round_coroutines_interleave():
    model, source, micro, key_to_mb = _setup(rounds=2)
    # micro-batch 1 runs both rounds before 0 and 2 have their first round
    order = [(1, 0), (1, 1), (2, 0), (0, 0), (0, 1), (2, 1)]
    fake = ScriptedSource(source, key_to_mb, order)
    finished = []
    outputs = {}

    def finish(mb, out):
        finished.append(mb.index)
        outputs[mb.index] = out

    stats = run_microbatches(
        micro, lambda mb: model.steps(mb.views, mb.sizes, mb.generator), fake.submit, finish
    )
    assert finished == [1, 0, 2]
    assert fake.completed == order
    assert stats.reads == 6
    reference = _reference(model, source, micro)
    for i in range(3):
        torch.testing.assert_close(outputs[i].logits, reference[i].logits)


def test_accumulated_gradients_equal_the_full_batch_gradient():
    model, source, micro, key_to_mb = _setup()
    n = sum(len(mb.keys) for mb in micro)
    fake = ScriptedSource(source, key_to_mb, [(1, 0), (2, 0), (0, 0)])

    def finish(mb, out):
        (loss_of(out, mb.labels) * len(mb.keys) / n).backward()

    run_microbatches(micro, lambda mb: model.steps(mb.views, mb.sizes, mb.generator), fake.submit, finish)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    reference = _reference(model, source, micro)
    total = sum(loss_of(reference[mb.index], mb.labels) * len(mb.keys) / n for mb in micro)
    total.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, msg=k)
        assert p.grad.abs().sum() > 0, f"{k} got no gradient"


def test_read_error_names_the_scenes():
    model, source, micro, _ = _setup(parts=2)

    def failing(keys, request):
        future: Future = Future()
        future.set_exception(OSError("connection reset"))
        return future

    with pytest.raises(RuntimeError, match=r"micro-batch 0 \(scenes \['scene-000'.*connection reset"):
        run_microbatches(micro, lambda mb: model.steps(mb.views, mb.sizes, mb.generator), failing,
                         lambda mb, out: None)


def test_model_without_reads_and_synchronous_source():
    _, source, micro, _ = _setup()
    model = ViewOnly()
    finished = []
    stats = run_microbatches(micro, lambda mb: model.steps(mb.views, mb.sizes), submitter(source),
                             lambda mb, out: finished.append(out.logits.shape[0]))
    assert finished == [2, 2, 2] and stats.reads == 0 and stats.wait_s == 0.0
    toy, _, _, _ = _setup()
    stats = run_microbatches(micro, lambda mb: toy.steps(mb.views, mb.sizes, mb.generator),
                             submitter(source), lambda mb, out: None)
    assert stats.reads == 3 and stats.wait_s == 0.0  # already-completed futures never block


def test_a_micro_batch_read_ahead_uses_its_future_and_submits_nothing():
    from dataclasses import replace

    from models.ats import ATS

    torch.manual_seed(0)
    model = ATS(in_channels=3, num_classes=2, view_size=(16, 16), patch_size=(4, 4), n_patches=2,
                attention_backbone_kwargs={"widths": (4,)}, feature_backbone_kwargs={"widths": (4,), "kernels": (3,)})
    _, source, micro, _ = _setup(parts=2)
    views = torch.nn.functional.interpolate(micro[0].views, size=(16, 16))
    first = replace(micro[0], views=views)
    proposal = model.propose(first.views, first.sizes, torch.Generator().manual_seed(1))
    prefetched: Future = Future()
    prefetched.set_result(source.read(first.keys, proposal.request))
    ahead = replace(first, proposal=proposal, prefetched=prefetched)
    submitted, outputs = [], []

    def submit(keys, request):
        submitted.append(keys)
        return submitter(source)(keys, request)

    run_microbatches([ahead], lambda mb: model.steps(mb.views, mb.sizes, None, proposal=mb.proposal),
                     submit, lambda mb, out: outputs.append(out))
    assert submitted == [] and torch.equal(outputs[0].boxes, proposal.request.boxes)
    with pytest.raises(RuntimeError, match="did not yield the proposal's request"):
        run_microbatches([ahead], lambda mb: model.steps(mb.views, mb.sizes, mb.generator),
                         submit, lambda mb, out: None)
