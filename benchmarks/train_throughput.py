"""Steady-state train throughput (images/s): JAX step vs PyTorch step, one run.

Each mode of `MODES` is built and compiled first (compile time reported
apart), warmed up, then timed in rounds: every round runs each mode for
`--steps` dispatches in turn, so the modes share the machine's load drifts
(this 2-core host is shared). Per mode: the median over rounds, min, max and
spread; per JAX mode: the ratio to the reference PyTorch mode, as the ratio of
medians and as the median of per-round ratios (robust to a slow round).

Modes (see `MODES`):
  jax_step_f32 / jax_step_bf16    the library step, `lt_calib.train.setup.build_for(...).update`
                                  (sampling, augmentation, UniMix, Bayias, SGD) on
                                  real CIFAR-10-LT, float32 / bfloat16 activations
  jax_model_f32 / jax_model_bf16  the model step alone: ResNet-32 from
                                  `lt_calib.models.create_model`, cross-entropy, SGD
                                  (momentum 0.9, weight decay 2e-4) on a fixed batch;
                                  independent of lt_calib.train, and the same work as
                                  the PyTorch step
  jax_model_f32_fused / _bf16_fused  the same with resnet_cifar.materialize_relu
                                  replaced by the identity: the model before it
                                  (not run by default; bf16 activations already
                                  skip it, so _bf16_fused is jax_model_bf16)
  jax_epoch_f32 / jax_epoch_bf16  the library step compiled as a lax.fori_loop of
                                  --chunk_steps steps per dispatch (the compiled
                                  epoch; on XLA:CPU ~15x slower than the step loop,
                                  see setup_lib.steps_per_dispatch)
  jax_vmap8_f32 / jax_vmap8_bf16  8 seeds vmapped in one program
                                  (lt_calib/train/population.py), --chunk_steps per dispatch;
                                  images/s counts all 8 models' images
  resnet50_f32 / resnet50_bf16    ImageNet-LT's ResNet-50 library step on a streamed
                                  (random uint8) batch at --resnet_size px
  torch_f32_cl / torch_f32        benchmarks/torch_resnet32.py, channels_last /
                                  contiguous NCHW, float32
  torch_bf16_cl / torch_bf16      the same under bf16 autocast

  python benchmarks/train_throughput.py [--modes=a,b] [--steps=10] [--repeats=7]
      [--batch_size=128] [--reference=auto] [--torch_threads=0] [--out=FILE.jsonl]

Output: one JSON line per mode (and a header line with the machine), then a
table. Besides wall-clock images/s, each mode reports images per CPU-second of
the process (img/cpu-s): on a shared host it counts the work a step needs,
not the time spent waiting for a core. Run with OMP_WAIT_POLICY=PASSIVE on a
shared host (see benchmarks/torch_resnet32.py: torch's spinning OpenMP
barriers slow its step up to 6x there). A new mode is a function `(args, context) -> Runner` registered with
`@register(name, framework, dtype, description)`; a mode that runs several
steps per dispatch (a compiled epoch) or several models at once (K-seed vmap)
says so through `Runner.images_per_call`.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]


@dataclasses.dataclass
class Runner:
  """A built, compiled mode.

  Attributes:
    run: run(calls) performs `calls` dispatches, waits for the results and
      returns the elapsed seconds.
    images_per_call: training images one dispatch processes (batch for a step;
      steps x batch for a compiled epoch; K x batch for K vmapped models).
    compile_s: seconds spent compiling (0 for eager PyTorch).
    info: extra fields for the JSON line.
  """
  run: Callable[[int], float]
  images_per_call: int
  compile_s: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Mode:
  name: str
  framework: str   # 'jax' or 'torch'
  dtype: str       # 'float32' or 'bfloat16'
  description: str
  build: Callable  # (args, context) -> Runner


MODES = {}


def register(name: str, framework: str, dtype: str, description: str):
  """Decorator adding a Runner factory `(args, context) -> Runner` to MODES."""
  def wrap(build):
    MODES[name] = Mode(name, framework, dtype, description, build)
    return build
  return wrap


class Context:
  """What modes share within a run: the dataset, loaded once and lazily."""

  def __init__(self):
    self._dataset = None

  def config(self, args, dtype: str):
    from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
    config = cifar10_lt.get_config()
    config.batch_size, config.model.dtype = args.batch_size, dtype
    config.mix.name, config.loss.name = args.mix, args.loss
    # The offline file only: a missing file should fail at once, not wait on
    # TFDS's download retries.
    config.dataset.source = "offline"
    return config

  def dataset(self, config):
    if self._dataset is None:
      from lt_calib.data import sources  # pylint: disable=g-import-not-at-top
      self._dataset = sources.load_dataset(config.dataset)
    return self._dataset


def _jax_runner(fn, state, args_tail, images_per_call, info):
  """Compiles fn(state, *args_tail) -> (state, out) AOT and wraps it in a Runner."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = fn.lower(state, *args_tail).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def run(calls):
    start = time.perf_counter()
    state = holder[0]
    for _ in range(calls):
      state, out = compiled(state, *args_tail)
    jax.block_until_ready((state, out))
    holder[0] = state
    return time.perf_counter() - start

  info = dict(info, jax=jax.__version__, device=str(jax.devices()[0]),
              xla_flags=os.environ.get("XLA_FLAGS", ""))
  return Runner(run, images_per_call, compile_s, info)


def _library_step(args, context, dtype):
  from lt_calib import parallel  # pylint: disable=g-import-not-at-top
  from lt_calib.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = context.config(args, dtype)
  setup = setup_lib.build_for([config], context.dataset(config), parallel.make_mesh())
  fed = setup.feed.fed(0, setup.run_keys)  # Epoch 0's permutation.
  return _jax_runner(setup.update, setup.state, (fed,) + tuple(setup.arrays),
                     args.batch_size, {"mix": args.mix, "loss": args.loss})


def _library_chunk(args, context, dtype, members: int = 1):
  """A compiled stretch of `--chunk_steps` library steps per dispatch.

  members > 1: that many seeds vmapped in one program (population.py).
  """
  from lt_calib import parallel  # pylint: disable=g-import-not-at-top
  from lt_calib.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = context.config(args, dtype)
  dataset = context.dataset(config)
  steps = min(args.chunk_steps, len(dataset.train_labels) // args.batch_size)
  config.steps_per_dispatch = steps
  if members == 1:
    setup = setup_lib.build_for([config], dataset, parallel.make_mesh())
  else:
    configs = [config.copy_and_resolve_references() for _ in range(members)]
    for seed, member in enumerate(configs):
      member.seed = seed
    setup = setup_lib.build_for(configs, dataset, parallel.make_mesh())
  fed = setup.feed.fed(0, setup.run_keys)  # Epoch 0's permutation(s).
  if setup.run_chunk is None:  # steps == 1: a chunk is the step loop.
    return _jax_runner(setup.update, setup.state, (fed,) + tuple(setup.arrays),
                       members * args.batch_size, {"members": members})
  steps = setup.chunk_steps
  return _jax_runner(setup.run_chunk, setup.state, (fed,) + tuple(setup.arrays),
                     members * steps * args.batch_size,
                     {"mix": args.mix, "loss": args.loss, "steps_per_dispatch": steps,
                      "members": members})


def _resnet50_step(args, context, dtype):
  """The library's streamed step for ImageNet-LT's ResNet-50 on random uint8 images.

  Everything the device does per step at `--resnet_size` px: normalisation,
  UniMix partners (R* batch, as tf.data would deliver it), mixing, Bayias,
  forward/backward, SGD; the input pipeline is measured by
  benchmarks/input_pipeline.py.
  """
  del context
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import imagenet_lt  # pylint: disable=g-import-not-at-top
  from lt_calib import parallel  # pylint: disable=g-import-not-at-top
  from lt_calib.data import long_tail, sources, streaming  # pylint: disable=g-import-not-at-top
  from lt_calib.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from lt_calib.train import step as step_lib  # pylint: disable=g-import-not-at-top
  config = imagenet_lt.get_config("resnet50")
  config.batch_size, config.model.dtype = args.resnet_batch, dtype
  size, classes, batch = args.resnet_size, 1000, args.resnet_batch
  # ImageNet-LT's class counts (1280 down to 5, exponential profile).
  counts = long_tail.long_tail_counts(1280, classes, 256.0, "exp")
  labels = np.repeat(np.arange(classes), counts).astype(np.int32)
  dataset = types.SimpleNamespace(
      info=sources.DatasetInfo(classes, size, 1280, None, None, sources.IMAGENET_MEAN,
                               sources.IMAGENET_STD, streaming=True),
      prior=long_tail.class_prior(labels, classes), train_labels=labels,
      image_shape=(size, size, 3))
  mesh = parallel.make_mesh()
  # The streamed step, fed a fixed batch (the input pipeline is benchmarked apart).
  feed = streaming.PipelineFeed(iter(()), mesh, batch)
  setup = setup_lib.build([config], dataset, mesh, feed,
                          [step_lib.make_step_config(config, dataset)])
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, classes, batch).astype(np.int32)}
  local["partner_image"], local["partner_label"] = local["image"][::-1], local["label"][::-1]
  global_batch = parallel.to_global(local, mesh, batch)
  del jax
  return _jax_runner(setup.update, setup.state, (global_batch,) + tuple(setup.arrays),
                     batch, {"model": "resnet_imagenet-50", "image_size": size,
                             "resnet_batch": batch})


def make_model_step(batch_size: int = 128, dtype: str = "float32", depth: int = 32,
                    num_classes: int = 10, seed: int = 0):
  """The JAX model step alone, the same work as benchmarks/torch_resnet32.py.

  Args:
    batch_size: images per step.
    dtype: model.dtype ('float32' or 'bfloat16'; parameters stay float32).
    depth: ResNet depth.
    num_classes: logits.
    seed: init and batch seed.

  Returns:
    (step, state, (images, labels)): step is jitted with the state donated and
    returns (state, loss); state is (params, batch_stats, opt_state).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from lt_calib import models  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict(dict(name="resnet_cifar", depth=depth, width=16,
                                       dtype=dtype, head="linear", head_scale=30.0))
  model = models.create_model(cfg, num_classes)
  init_key, image_key, label_key = jax.random.split(jax.random.key(seed), 3)
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_key, jnp.zeros((1, 32, 32, 3)))
  # As lt_calib/train/state.py's optimizer: decay added to the gradient before momentum.
  tx = optax.chain(optax.add_decayed_weights(2e-4), optax.sgd(0.1, momentum=0.9))
  state = (variables["params"], variables["batch_stats"],
           tx.init(variables["params"]))
  images = jax.random.normal(image_key, (batch_size, 32, 32, 3))
  labels = jax.random.randint(label_key, (batch_size,), 0, num_classes)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_of(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                    images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return step, state, (images, labels)


def _model_step(args, context, dtype, materialize=True):
  del context
  from lt_calib.models import resnet_cifar  # pylint: disable=g-import-not-at-top
  step, state, batch = make_model_step(args.batch_size, dtype)
  saved = resnet_cifar.materialize_relu
  if not materialize:
    # The model as it was before materialize_relu: XLA:CPU free to fuse (and
    # duplicate) the residual stream into every consumer. Traced inside
    # _jax_runner's lower(), so the patch is undone before any other mode.
    resnet_cifar.materialize_relu = lambda x: x
  try:
    return _jax_runner(step, state, batch, args.batch_size,
                       {"materialize_relu": materialize})
  finally:
    resnet_cifar.materialize_relu = saved


def _torch_step(args, context, dtype, channels_last):
  del context
  import torch_resnet32  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    # On a contended host one thread can beat two (no barriers to wait at).
    torch_resnet32.torch.set_num_threads(args.torch_threads)
  step, _ = torch_resnet32.make_step(args.batch_size, channels_last, dtype)
  return Runner(functools.partial(torch_resnet32.time_steps, step), args.batch_size, 0.0,
                {"channels_last": channels_last, "threads": torch_resnet32.torch.get_num_threads(),
                 "torch": torch_resnet32.torch.__version__})


for _dtype, _suffix in (("float32", "f32"), ("bfloat16", "bf16")):
  register(f"jax_step_{_suffix}", "jax", _dtype,
           "library step: setup.build_for(...).update on CIFAR-10-LT")(
               functools.partial(_library_step, dtype=_dtype))
  register(f"jax_model_{_suffix}", "jax", _dtype,
           "model step: create_model + cross-entropy + SGD, fixed batch")(
               functools.partial(_model_step, dtype=_dtype))
  register(f"jax_model_{_suffix}_fused", "jax", _dtype,
           "model step with materialize_relu off (the model before it)")(
               functools.partial(_model_step, dtype=_dtype, materialize=False))
  register(f"jax_epoch_{_suffix}", "jax", _dtype,
           "library steps compiled as one lax.fori_loop per dispatch (--chunk_steps)")(
               functools.partial(_library_chunk, dtype=_dtype))
  register(f"jax_vmap8_{_suffix}", "jax", _dtype,
           "8 seeds vmapped in one program, --chunk_steps steps per dispatch")(
               functools.partial(_library_chunk, dtype=_dtype, members=8))
  register(f"resnet50_{_suffix}", "jax", _dtype,
           "ImageNet-LT ResNet-50 library step (streamed batch) at --resnet_size px")(
               functools.partial(_resnet50_step, dtype=_dtype))
  register(f"torch_{_suffix}_cl", "torch", _dtype, "PyTorch step, channels_last")(
      functools.partial(_torch_step, dtype=_dtype, channels_last=True))
  register(f"torch_{_suffix}", "torch", _dtype, "PyTorch step, contiguous NCHW")(
      functools.partial(_torch_step, dtype=_dtype, channels_last=False))

DEFAULT_MODES = ("jax_step_f32", "jax_step_bf16", "jax_model_f32", "jax_model_bf16",
                 "torch_f32_cl", "torch_f32", "torch_bf16_cl")


def summarize(rates: list) -> dict:
  """Median, min, max and relative spread ((max - min) / median) of rates."""
  median = statistics.median(rates)
  return {"images_per_s": median, "min": min(rates), "max": max(rates),
          "spread": (max(rates) - min(rates)) / median,
          "repeats": [round(r, 2) for r in rates]}


def machine() -> dict:
  """CPU model, core count and load average, recorded with every run."""
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": model, "cores": os.cpu_count(),
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def measure(modes: list, args) -> list:
  """Builds, warms up and times `modes` in interleaved rounds.

  Args:
    modes: names in MODES.
    args: parsed flags (steps, repeats, warmup, batch_size, ...).

  Returns:
    One dict per mode: summary of the per-round images/s, compile_s,
    the mode's settings, and 'rates' (per round, for the ratios).
  """
  context, runners = Context(), {}
  for name in modes:
    runners[name] = MODES[name].build(args, context)
    runners[name].run(args.warmup)
    print(f"# built {name} (compile {runners[name].compile_s:.1f} s)", file=sys.stderr,
          flush=True)
  rates = {name: [] for name in modes}
  cpu_rates = {name: [] for name in modes}
  for round_ in range(args.repeats):
    # Rotate the order so no mode always runs right after the same one.
    for name in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
      runner = runners[name]
      cpu_start = time.process_time()
      seconds = runner.run(args.steps)
      cpu_seconds = time.process_time() - cpu_start
      images = args.steps * runner.images_per_call
      rates[name].append(images / seconds)
      cpu_rates[name].append(images / cpu_seconds)
  results = []
  for name in modes:
    mode, runner = MODES[name], runners[name]
    result = {"mode": name, "framework": mode.framework, "dtype": mode.dtype}
    result.update(summarize(rates[name]))
    # Images per CPU-second of this process (all its threads): on a shared
    # host it counts the work done, not the time spent waiting for a core.
    result["images_per_cpu_s"] = statistics.median(cpu_rates[name])
    result.update(compile_s=round(runner.compile_s, 2), batch_size=args.batch_size,
                  steps=args.steps, images_per_call=runner.images_per_call,
                  description=mode.description, **runner.info)
    results.append(result)
  return results


def add_ratios(results: list, reference: str) -> str | None:
  """Adds ratio_to_torch (of medians) and ratio_per_round to every JAX result.

  Args:
    results: output of measure (with per-round 'repeats').
    reference: a torch mode name, or 'auto' for the fastest float32 torch mode.

  Returns:
    The reference mode name, or None when no torch mode ran.
  """
  torch_modes = [r for r in results if r["framework"] == "torch"]
  if reference == "auto":
    candidates = [r for r in torch_modes if r["dtype"] == "float32"] or torch_modes
    if not candidates:
      return None
    ref = max(candidates, key=lambda r: r["images_per_s"])
  else:
    ref = next((r for r in results if r["mode"] == reference), None)
    if ref is None:
      return None
  for result in results:
    if result["framework"] == "jax":
      result["reference"] = ref["mode"]
      result["ratio_to_torch"] = result["images_per_s"] / ref["images_per_s"]
      result["ratio_per_round"] = statistics.median(
          a / b for a, b in zip(result["repeats"], ref["repeats"]))
      result["ratio_cpu"] = result["images_per_cpu_s"] / ref["images_per_cpu_s"]
  return ref["mode"]


def table(results: list, reference: str | None) -> str:
  """A readable table of the results."""
  lines = [f"{'mode':<20} {'img/s':>8} {'min':>8} {'max':>8} {'spread':>7} "
           f"{'img/cpu-s':>9} {'compile s':>9} {'ratio':>6} {'per-round':>9} {'cpu':>5}"]
  for r in results:
    cells = [f"{r[key]:.2f}" if key in r else ""
             for key in ("ratio_to_torch", "ratio_per_round", "ratio_cpu")]
    lines.append(f"{r['mode']:<20} {r['images_per_s']:8.1f} {r['min']:8.1f} "
                 f"{r['max']:8.1f} {100 * r['spread']:6.0f}% {r['images_per_cpu_s']:9.1f} "
                 f"{r['compile_s']:9.1f} {cells[0]:>6} {cells[1]:>9} {cells[2]:>5}")
  if reference:
    lines.append(f"ratio: JAX images/s / {reference} images/s (medians over rounds); "
                 "per-round: median of the per-round ratios; cpu: the same with "
                 "images per CPU-second")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                      help=f"comma-separated, of: {', '.join(MODES)}")
  parser.add_argument("--steps", type=int, default=10, help="timed dispatches per round")
  parser.add_argument("--repeats", type=int, default=7, help="rounds")
  parser.add_argument("--warmup", type=int, default=3, help="untimed dispatches")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--chunk_steps", type=int, default=96,
                      help="steps per dispatch of the jax_epoch / jax_vmap8 modes (96 = "
                           "an epoch of CIFAR-10-LT at batch 128)")
  parser.add_argument("--resnet_batch", type=int, default=64, help="resnet50 modes' batch")
  parser.add_argument("--resnet_size", type=int, default=224, help="resnet50 modes' px")
  parser.add_argument("--mix", default="unimix", help="library step's mix.name")
  parser.add_argument("--loss", default="bayias", help="library step's loss.name")
  parser.add_argument("--reference", default="auto",
                      help="torch mode of the ratio; 'auto': the fastest float32 one")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch intra-op threads; 0: torch's default (one per core)")
  parser.add_argument("--out", default="", help="also append the JSON lines here")
  args = parser.parse_args()
  modes = [m for m in args.modes.split(",") if m]
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    parser.error(f"unknown modes {unknown}; allowed: {sorted(MODES)}")
  header = {"machine": machine(), "argv": sys.argv[1:]}
  results = measure(modes, args)
  reference = add_ratios(results, args.reference)
  header["load_average_after"] = machine()["load_average"]
  lines = [json.dumps(header)] + [json.dumps(r) for r in results]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")
  print(table(results, reference))


if __name__ == "__main__":
  main()
