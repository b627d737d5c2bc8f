"""Property-based fuzzing of GreenPost through its public API, `greenpost()` and `GreenPostOptions` (issue 13).

Any valid input (sizes, 1/3/4 channels, float dtypes, constant, extreme and green-screen images, a prior,
every option) gives finite output of the right shape with alpha in 0..1. Any invalid input (NaN/Inf, values
outside 0..1, integer dtypes, other shapes, bad options) gives the clear ValueError and nothing else.

Deterministic by default (derandomized, no example database, a fixed number of examples) so `make test`
stays fast and repeatable; HYPOTHESIS_PROFILE=explore runs many more random examples.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffumatting.models.greenpost import GreenPostOptions, greenpost

settings.register_profile("diffumatting-ci", derandomize=True, database=None, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "diffumatting-ci")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_SIDE = 32  # GreenPost costs about 1 s per call even on tiny images (measured, 2-core CPU)


def _unit(draw) -> float:
    return draw(st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False))


@st.composite
def images(draw):
    """(B, H, W, C) float images in [0, 1] of several kinds."""
    b = draw(st.sampled_from([1, 1, 1, 2]))
    h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    c = draw(st.sampled_from([1, 3, 4]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["random", "constant", "extreme", "green screen", "ramp"]))
    if kind == "random":
        img = torch.rand(b, h, w, c, generator=gen)
    elif kind == "constant":
        img = torch.full((b, h, w, c), _unit(draw))
    elif kind == "extreme":
        img = (torch.rand(b, h, w, c, generator=gen) > 0.5).float()
    elif kind == "ramp":
        img = torch.linspace(0, 1, h * w).view(1, h, w, 1).expand(b, h, w, c).contiguous()
    else:
        img = torch.empty(b, h, w, c)
        img[...] = torch.tensor([0.1, 0.7, 0.2, 1.0][:c] if c > 1 else [0.5])
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        img[:, y0:y0 + max(1, h // 2), x0:x0 + max(1, w // 2)] = torch.rand(c, generator=gen)
        img = (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    return img.to(draw(st.sampled_from(FLOAT_DTYPES)))


@st.composite
def options(draw):
    key = None
    if draw(st.booleans()):
        channel = draw(st.integers(0, 2))
        key = [draw(st.floats(0.0, 0.4)) for _ in range(3)]
        key[channel] = draw(st.floats(0.5, 1.0))
    clip_black = draw(st.floats(0.0, 0.98))
    clip_white = draw(st.floats(min(1.0, clip_black + 0.01), 1.0))
    return GreenPostOptions(key_color=None if key is None else tuple(key), spill_strength=_unit(draw),
                            edge_detail=_unit(draw), clip_black=clip_black, clip_white=clip_white)


@st.composite
def priors(draw, image):
    if not draw(st.booleans()):
        return None
    b, h, w, _ = image.shape
    n = draw(st.sampled_from([1, b]))
    kind = draw(st.sampled_from(["random", "binary", "constant"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "random":
        return torch.rand(n, h, w, generator=gen)
    if kind == "binary":
        return (torch.rand(n, h, w, generator=gen) > 0.5).float()
    return torch.full((n, h, w), _unit(draw))


@settings(settings.get_profile(PROFILE), max_examples=min(settings.get_profile(PROFILE).max_examples, 24)
          if PROFILE == "diffumatting-ci" else settings.get_profile(PROFILE).max_examples)
@given(data=st.data())
def test_valid_input_gives_finite_output_and_alpha_in_0_1(data):
    image = data.draw(images(), label="image")
    prior = data.draw(priors(image), label="prior")
    opts = data.draw(options(), label="options")
    fg, alpha = greenpost(image, prior, opts)
    b, h, w, _ = image.shape
    assert fg.shape == (b, h, w, 3) and alpha.shape == (b, h, w)
    assert fg.dtype == torch.float32 and alpha.dtype == torch.float32
    assert bool(torch.isfinite(fg).all()), "foreground has NaN/Inf"
    assert bool(torch.isfinite(alpha).all()), "alpha has NaN/Inf"
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
    if image.shape[-1] == 4:  # the image's own alpha multiplies the result: transparent stays transparent
        assert bool((alpha[image[..., 3].float() == 0] == 0).all())


@st.composite
def broken_images(draw):
    """Images greenpost() must refuse, and the words its ValueError must contain."""
    b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    c = draw(st.sampled_from([1, 3, 4]))
    img = torch.rand(b, h, w, c)
    kind = draw(st.sampled_from(["nan", "inf", "-inf", "above", "below", "int", "channels", "ndim", "empty"]))
    if kind in ("nan", "inf", "-inf"):
        flat = img.view(-1)
        for i in draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=4)):
            flat[i] = float(kind)
        return img, "NaN or infinite"
    if kind == "above":
        img.view(-1)[draw(st.integers(0, img.numel() - 1))] = draw(st.floats(1.02, 1e30))
        return img, "expected \\[0, 1\\]"
    if kind == "below":
        img.view(-1)[draw(st.integers(0, img.numel() - 1))] = draw(st.floats(-1e30, -0.02))
        return img, "expected \\[0, 1\\]"
    if kind == "int":
        dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64, torch.bool]))
        return (img * 255).to(dtype), "dtype"
    if kind == "channels":
        return torch.rand(b, h, w, draw(st.sampled_from([0, 2, 5, 8]))), "expected \\(B, H, W, C\\)"
    if kind == "ndim":
        shape = draw(st.sampled_from([(h, w), (h, w, c), (b, 1, h, w, c), (h,)]))
        return torch.rand(shape), "expected \\(B, H, W, C\\)"
    return torch.rand(b, 0, w, c) if draw(st.booleans()) else torch.rand(0, h, w, c), "empty"


@settings.get_profile(PROFILE)
@given(case=broken_images())
def test_invalid_image_gives_the_clear_value_error(case):
    image, words = case
    with pytest.raises(ValueError, match=words):
        greenpost(image)


@settings.get_profile(PROFILE)
@given(data=st.data())
def test_invalid_prior_gives_the_clear_value_error(data):
    image = torch.rand(2, 8, 9, 3)
    kind = data.draw(st.sampled_from(["nan", "range", "shape", "batch"]))
    prior = torch.rand(2, 8, 9)
    if kind == "nan":
        prior[1, data.draw(st.integers(0, 7)), 0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        words = "NaN or infinite"
    elif kind == "range":
        prior[0, 0, 0] = data.draw(st.one_of(st.floats(1.02, 1e9), st.floats(-1e9, -0.02)))
        words = "expected \\[0, 1\\]"
    elif kind == "shape":
        prior = torch.rand(2, data.draw(st.integers(1, 7)), 9)
        words = "resize the mask"
    else:
        prior = torch.rand(3, 8, 9)
        words = "to match"
    with pytest.raises(ValueError, match=words):
        greenpost(image, prior)


BAD_OPTION_VALUES = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                              st.floats(1.0001, 1e9), st.floats(-1e9, -0.0001))


@settings.get_profile(PROFILE)
@given(name=st.sampled_from(["spill_strength", "edge_detail", "clip_black", "clip_white"]), value=BAD_OPTION_VALUES)
def test_invalid_option_gives_the_clear_value_error(name, value):
    with pytest.raises(ValueError, match=name):
        GreenPostOptions(**{name: value})


@settings.get_profile(PROFILE)
@given(key=st.one_of(
    st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 3).filter(
        lambda k: not all(math.isfinite(v) and 0 <= v <= 1 for v in k)),
    st.floats(0, 1).map(lambda v: (v, v, v)),  # grey: no dominant channel
    st.lists(st.floats(0, 1), min_size=0, max_size=5).filter(lambda k: len(k) != 3).map(tuple)))
def test_invalid_key_colour_gives_the_clear_value_error(key):
    with pytest.raises(ValueError, match="key_color"):
        GreenPostOptions(key_color=key)
