"""One device check (``validation.check_device``) behind every device argument: the task
families, the distributed context, the sine and omniglot jobs' ``--device``.  The same input gets
the same words everywhere, and a device this machine lacks is named before any work starts."""
import pytest
import torch

from reptile_fast import Sine
from reptile_fast.distributed.context import DistContext, setup_from_env
from reptile_fast.fewshot_job import _check_device as omniglot_device_problem
from reptile_fast.validation import check_device

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("device, want", [("cpu", torch.device("cpu")), (torch.device("cpu"), torch.device("cpu")),
                                          ("meta", torch.device("meta"))])
def test_good_devices(device, want):
    assert check_device(device) == want


@pytest.mark.parametrize("device, error, words", [
    ("tpu0", ValueError, "device: unknown device 'tpu0'"),
    ("cuda:x", ValueError, "unknown device 'cuda:x'"),
    (1.5, TypeError, "device must be a torch.device or a name such as 'cpu' or 'cuda', got float"),
    (True, TypeError, "got bool"),
    (None, TypeError, "got NoneType"),
    pytest.param("cuda", ValueError, "device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(CUDA, reason="CUDA is available here")),
    pytest.param("cuda:7", ValueError, "device cuda:7: CUDA is not available",
                 marks=pytest.mark.skipif(CUDA, reason="CUDA is available here")),
])
def test_bad_devices_are_named(device, error, words):
    with pytest.raises(error, match=words):
        check_device(device)


def test_allowed_types_name_the_job():
    with pytest.raises(ValueError, match="--device meta: the sine job runs on cpu or cuda"):
        check_device("meta", what="--device", allowed=("cpu", "cuda"), job="the sine job")


def test_every_entry_point_gives_the_same_words():
    words = "unknown device 'tpu0'"
    with pytest.raises(ValueError, match=words):
        Sine().sample(2, device="tpu0")
    with pytest.raises(ValueError, match=words):
        DistContext.single("tpu0")
    with pytest.raises(ValueError, match=words):
        setup_from_env(device="tpu0")
    assert words in omniglot_device_problem("tpu0")


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_unavailable_cuda_is_named_by_every_entry_point(monkeypatch):
    words = "CUDA is not available on this machine"
    with pytest.raises(ValueError, match=words):
        Sine().sample(2, device="cuda")
    with pytest.raises(ValueError, match=words):
        DistContext.single("cuda")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=words):
        setup_from_env(device="cuda:3")  # the index is torchrun's to choose, the type must exist
    assert words in omniglot_device_problem("cuda")


def test_the_index_is_checked_only_where_it_is_kept(monkeypatch):
    """setup_from_env replaces a CUDA index by LOCAL_RANK under torchrun, so only the type must
    exist there; elsewhere an index beyond the visible devices is named."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="device cuda:3: only 1 CUDA device"):
        check_device("cuda:3")
    assert check_device("cuda:3", check_index=False) == torch.device("cuda", 3)
