"""ImageNet ResNets (ResNet-10 ... ResNet-152): parameter counts, shapes, bfloat16, mixup hooks.

Counts and shapes of full-width models come from `jax.eval_shape` (nothing is
computed); anything compiled uses width 4 on 32 px images so that the file
runs in seconds on a CPU.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lt_calib import errors, models

from lt_calib.method import mixing
from lt_calib.models import resnet_imagenet


def build(depth, width=64, classes=1000, dtype="float32", head="linear"):
  cfg = ml_collections.ConfigDict(dict(name="resnet_imagenet", depth=depth, width=width,
                                       dtype=dtype, head=head, head_scale=30.0))
  return models.create_model(cfg, classes)


def abstract_variables(model, size=32):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def random_variables(model, images, seed=0):
  """Variables of `model.init`'s shapes and dtypes, drawn with NumPy.

  Compiling `init` costs seconds of threefry code on a CPU; the tests below
  need only plausible values: He-scaled kernels, BatchNorm scale 1, bias 0,
  running mean 0 and variance 1.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
    return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return jax.tree_util.tree_map_with_path(draw, abstract)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_resnet10_parameter_count():
  # By hand, conv k*k*c_in*c_out (no bias), BN 2c, projection 1x1 conv + BN:
  # stem 7*7*3*64 + 2*64 = 9536;
  # stage 1 (64 -> 64, identity): 2*(9*64*64) + 2*(2*64) = 73984;
  # stage 2 (64 -> 128): 9*64*128 + 9*128*128 + 4*128 + (64*128 + 2*128) = 230144;
  # stage 3 (128 -> 256): 9*128*256 + 9*256*256 + 4*256 + (128*256 + 2*256) = 919040;
  # stage 4 (256 -> 512): 9*256*512 + 9*512*512 + 4*512 + (256*512 + 2*512) = 3673088;
  # head 512*1000 + 1000 = 513000.
  # Cross-check: ResNet-18 adds one identity block per stage, 2*9*w^2 + 4w for
  # w = 64, 128, 256, 512: 73984 + 295424 + 1180672 + 4720640 = 6270720, and
  # 5418792 + 6270720 = 11,689,512 is torchvision's resnet18.
  expected = 9536 + 73984 + 230144 + 919040 + 3673088 + 513000
  assert expected == 5418792
  assert count(abstract_variables(build(10))["params"]) == expected
  assert expected + 6270720 == 11689512 == count(abstract_variables(build(18))["params"])


def test_resnet50_parameter_count():
  # Bottleneck(c_in, w): 1x1 c_in*w + BN 2w, 3x3 9*w*w + BN 2w, 1x1 w*4w + BN 8w;
  # the first block of a stage adds the projection c_in*4w + 8w.
  # stem: 7*7*3*64 + 2*64 = 9536.
  # stage 1, w=64:  first (c_in 64) 75008, then 2 x (c_in 256) 70400 -> 215808.
  #   75008 = 4096+128 + 36864+128 + 16384+512 + 16384+512.
  #   70400 = 16384+128 + 36864+128 + 16384+512.
  # stage 2, w=128: first (256) 379392, then 3 x (512) 280064 -> 1219584.
  #   379392 = 32768+256 + 147456+256 + 65536+1024 + 131072+1024.
  #   280064 = 65536+256 + 147456+256 + 65536+1024.
  # stage 3, w=256: first (512) 1512448, then 5 x (1024) 1117184 -> 7098368.
  #   1512448 = 131072+512 + 589824+512 + 262144+2048 + 524288+2048.
  #   1117184 = 262144+512 + 589824+512 + 262144+2048.
  # stage 4, w=512: first (1024) 6039552, then 2 x (2048) 4462592 -> 14964736.
  #   6039552 = 524288+1024 + 2359296+1024 + 1048576+4096 + 2097152+4096.
  #   4462592 = 1048576+1024 + 2359296+1024 + 1048576+4096.
  # head: 2048*1000 + 1000 = 2049000.
  stages = [75008 + 2 * 70400, 379392 + 3 * 280064, 1512448 + 5 * 1117184,
            6039552 + 2 * 4462592]
  assert stages == [215808, 1219584, 7098368, 14964736]
  expected = 9536 + sum(stages) + 2049000
  # torchvision's resnet50 (its weights' documented num_params).
  assert expected == 25557032
  assert count(abstract_variables(build(50))["params"]) == expected


@pytest.mark.parametrize("depth,expected", [(34, 21797672), (101, 44549160),
                                            (152, 60192808)])
def test_deeper_parameter_counts_match_torchvision(depth, expected):
  # torchvision's documented num_params of resnet34/101/152 (1000 classes).
  assert count(abstract_variables(build(depth))["params"]) == expected


def test_normalized_head_has_no_bias():
  # NormalizedLinear: a 512 x 10 kernel, no bias; the linear head 512*10 + 10.
  linear = count(abstract_variables(build(10, classes=10))["params"])
  normalized = count(abstract_variables(build(10, classes=10, head="normalized"))["params"])
  assert linear - normalized == 10


@pytest.mark.parametrize("depth,expansion", [(10, 1), (50, 4)])
@pytest.mark.parametrize("size,spatial", [(224, (56, 28, 14, 7)), (32, (8, 4, 2, 1)),
                                          (64, (16, 8, 4, 2))])
def test_output_and_stage_shapes(depth, expansion, size, spatial):
  # Stem 7x7/2 and max-pool 3x3/2 divide the side by 4; stages 2-4 halve it
  # Channels 64 * (1, 2, 4, 8) * expansion.
  model = build(depth)
  images = jnp.zeros((2, size, size, 3))
  variables = abstract_variables(model, size)
  # A mix whose layer (-1) is none of 0..4: nothing is mixed, stages are sown.
  no_layer = mixing.HiddenMix(jnp.arange(2), jnp.ones(2), jnp.int32(-1))
  logits, state = jax.eval_shape(
      lambda v: model.apply(v, images, train=True, mix=no_layer,
                            mutable=["batch_stats", "intermediates"]), variables)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  for stage in range(4):
    hidden = state["intermediates"][f"stage{stage + 1}_input_to_mix"][0]
    side = spatial[stage]
    assert hidden.shape == (2, side, side, 64 * 2 ** stage * expansion)


# A bfloat16 forward compiles for ~5 s (ResNet-10) and ~10 s (ResNet-50) from a
# cold cache: full suite only (TestManifoldHooks compiles a float32 forward in
# the fast tier).
@pytest.mark.slow
@pytest.mark.parametrize("depth", [10, 50])
def test_bfloat16_forward(depth):
  model = build(depth, width=4, classes=7, dtype="bfloat16")
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # init makes float32 parameters and statistics under a bfloat16 dtype.
  for leaf in jax.tree.leaves(abstract_variables(model)):
    assert leaf.dtype == jnp.float32
  variables = random_variables(model, images)
  no_layer = mixing.HiddenMix(jnp.arange(4), jnp.ones(4), jnp.int32(-1))
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mix=no_layer, mutable=["batch_stats", "intermediates"]))(
          variables, images)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Computation in bfloat16, updated statistics in float32.
  assert state["intermediates"]["stage4_input_to_mix"][0].dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(state["batch_stats"]):
    assert leaf.dtype == jnp.float32
  # The statistics moved: 0.9 * 1 + 0.1 * batch variance != 1 somewhere.
  old, new = (jax.tree.leaves(v) for v in (variables["batch_stats"], state["batch_stats"]))
  assert any(not np.allclose(a, b) for a, b in zip(old, new))
  # The same function as in float32, up to bfloat16 rounding (8-bit mantissa).
  full = build(depth, width=4, classes=7, dtype="float32")
  evaluate = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, images)
  # Running statistics at init (mean 0, variance 1) let activations grow
  # through the blocks, so the tolerance scales with the logits.
  reference = np.asarray(evaluate(full))
  np.testing.assert_allclose(evaluate(model), reference, atol=0.05 * np.abs(reference).max())


def test_depth_validation():
  with pytest.raises(errors.ConfigError,
                     match=r"^model\.depth=20 .*allowed: \(10, 18, 34, 50, 101, 152\)\.$"):
    build(20)
  module = resnet_imagenet.ResNetImageNet(num_classes=10, depth=26)
  with pytest.raises(errors.ConfigError, match=r"model\.depth=26"):
    module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


BATCH = 4
PARTNER = np.array([2, 0, 3, 1])  # No sample is its own partner.


@pytest.fixture(scope="module")
def hooked():
  """Images, a forward pass with a HiddenMix, and one without."""
  model = build(10, width=4, classes=5)
  images = jax.random.normal(jax.random.key(3), (BATCH, 32, 32, 3))
  variables = random_variables(model, images)

  @jax.jit
  def forward(x, partner, weight, layer):
    mix = mixing.HiddenMix(partner, weight, layer)
    logits, state = model.apply(variables, x, train=True, mix=mix,
                                mutable=["batch_stats", "intermediates"])
    sown = [state["intermediates"][f"stage{s}_input_to_mix"][0] for s in range(1, 5)]
    return logits, sown

  @jax.jit
  def plain(x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

  return images, forward, plain


class TestManifoldHooks:
  """Mixing at layer k with weight 0 hands every sample its partner's state from k on."""

  def test_no_layer_is_plain_forward(self, hooked):
    images, forward, plain = hooked
    logits, _ = forward(images, PARTNER, jnp.full(BATCH, 0.5), jnp.int32(-1))
    np.testing.assert_allclose(logits, plain(images), rtol=1e-5, atol=1e-5)

  @pytest.mark.parametrize("layer", [0, 1, 2, 3, 4])
  def test_full_swap_at_layer(self, hooked, layer):
    # Weight 0: the state becomes the partner's. The partners are a
    # permutation, so batch statistics are those of the unmixed batch and
    # every later state (and the logits) is the unmixed one permuted.
    images, forward, _ = hooked
    reference_logits, reference = forward(images, PARTNER, jnp.ones(BATCH),
                                          jnp.int32(-1))
    logits, sown = forward(images, PARTNER, jnp.zeros(BATCH), jnp.int32(layer))
    np.testing.assert_allclose(logits, reference_logits[PARTNER], rtol=1e-4, atol=1e-4)
    for stage in range(1, 5):
      expected = reference[stage - 1]
      if stage > layer:
        expected = expected[PARTNER]
        assert not np.allclose(expected, reference[stage - 1], atol=1e-3)
      np.testing.assert_allclose(sown[stage - 1], expected, rtol=1e-4, atol=1e-4)

  def test_half_mix_of_input_equals_mixed_images(self, hooked):
    images, forward, plain = hooked
    weight = jnp.array([0.5, 0.25, 1.0, 0.75])
    logits, _ = forward(images, PARTNER, weight, jnp.int32(0))
    w = weight[:, None, None, None]
    by_hand = w * images + (1 - w) * images[PARTNER]
    np.testing.assert_allclose(logits, plain(by_hand), rtol=1e-4, atol=1e-4)
