"""DevicePrefetcher: the batches of the stream, on the device, one copy ahead; its state resumes exactly."""

from __future__ import annotations

import pytest
import torch

from vitef.data import DevicePrefetcher, build_loader, make_iterable

KW = dict(batch_size=20, size=8, seed=3, drop_last=True, num_workers=0)


def _stream(device: str) -> DevicePrefetcher:
    return DevicePrefetcher(
        make_iterable(build_loader("digits_subset-01", "train", **KW, device=device), seed=3), device
    )


def _check(device: str) -> None:
    expected = make_iterable(build_loader("digits_subset-01", "train", **KW), seed=3)
    want, states = [], []
    for _ in range(14):  # 11 batches per epoch: crosses an epoch boundary
        want.append(next(expected))
        states.append(expected.state_dict())
    it = _stream(device)
    assert it.num_classes == 2
    got = []
    for k in range(14):
        images, labels = next(it)
        assert images.device.type == torch.device(device).type
        got.append((images.cpu(), labels.cpu()))
        assert it.state_dict() == states[k]
        if k % 3:  # as the training step does (and not always: next() alone fetches on demand)
            it.prefetch()
            it.prefetch()  # a batch already waiting: nothing more is fetched
            # The state is that of the plain stream after as many batches: the one fetched ahead is not consumed.
            assert it.state_dict() == states[k]
            if k + 1 < len(states):
                assert it.batches.state_dict() == states[k + 1]  # the loader is one batch further
    for (x, y), (a, b) in zip(got, want, strict=True):
        assert torch.equal(x, a) and torch.equal(y, b)
    # Resuming from the state after 5 batches gives batches 5, 6, ... again.
    it = _stream(device)
    for _ in range(5):
        next(it)
        it.prefetch()  # the checkpoint is taken with a batch fetched ahead, as in a run
    state = it.state_dict()
    resumed = _stream(device)
    resumed.load_state_dict(state)
    for k in range(5, 9):
        x, y = next(resumed)
        assert torch.equal(x.cpu(), want[k][0]) and torch.equal(y.cpu(), want[k][1])


def test_prefetcher_hands_out_the_stream_and_resumes_on_cpu():
    _check("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prefetcher_copies_ahead_on_a_side_stream_and_resumes_on_cuda():
    _check("cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])  # fmt: skip
def test_uint8_batches_normalised_by_the_prefetcher_equal_the_float_loader(device):
    float_loader = make_iterable(build_loader("digits_subset-01", "train", **KW), seed=3)
    uint8_loader = build_loader("digits_subset-01", "train", **KW, output="uint8", device=device)
    raw = next(make_iterable(build_loader("digits_subset-01", "train", **KW, output="uint8"), seed=3))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (20, 3, 8, 8)
    normalize = uint8_loader.dataset.transform.normalizer
    it = DevicePrefetcher(make_iterable(uint8_loader, seed=3), device, normalize=normalize)
    for _ in range(12):
        (x, y), (a, b) = next(it), next(float_loader)
        assert x.dtype == torch.float32 and x.device.type == device
        assert torch.equal(x.cpu(), a) and torch.equal(y.cpu(), b)  # bit for bit


class _Recorder(torch.nn.Module):
    """A linear model that records its forward and its backward into ``events``."""

    def __init__(self, events: list[str]):
        super().__init__()
        self.head = torch.nn.Linear(4, 3)
        self.events = events

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.events.append("forward")
        out = self.head(x)  # (B, 3)
        out.register_hook(lambda g: self.events.append("backward"))
        return out


class _Batches:
    """Batches that record when the step takes one (``next``) and when it asks for the next ahead (``prefetch``)."""

    def __init__(self, events: list[str]):
        self.events = events

    def __next__(self):
        self.events.append("next")
        return torch.ones(8, 4), torch.zeros(8, dtype=torch.long)

    def prefetch(self) -> None:
        self.events.append("prefetch")


def test_the_training_step_fetches_the_next_batch_once_its_own_work_is_queued():
    from apps.vit import train as train_app
    from vitef.optim import OptimConfig

    events: list[str] = []
    model = _Recorder(events)
    cfg = OptimConfig(lr=0.1, warmup_steps=0, scheduler="constant", grad_accumulation=2)
    stepper = train_app.Stepper.build(model, model, cfg, 10, torch.device("cpu"), "fp32")
    row = train_app.train_step(stepper, _Batches(events))
    # Per micro-batch: take the batch, queue forward and backward, then fetch the next one while they run.
    assert events == ["next", "forward", "backward", "prefetch"] * 2
    assert row["data_wait_ms"] >= 0
