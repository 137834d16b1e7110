"""Files on local disks and on Cloud Storage (the local GCS emulator)."""

import json

import numpy as np
import pytest

from lt_calib import reporting, storage
from lt_calib.data import tfds_source


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_json_lines_append_one_record_at_a_time_and_resume(where, tmp_path, request,
                                                            monkeypatch):
  folder = (request.getfixturevalue("gcs").folder("logs") if where == "gcs"
            else str(tmp_path))
  storage.as_path(folder).mkdir(parents=True, exist_ok=True)
  path = f"{folder}/metrics.jsonl"
  uploads = []
  if where == "gcs":
    # Watch what the real client sends (it still sends it): one small object
    # per append, composed on the server, never the whole file again.
    fs = storage.gcs_filesystem()
    monkeypatch.setattr(fs, "pipe", lambda target, data, _pipe=fs.pipe, **kw: (
        uploads.append(len(data)), _pipe(target, data, **kw))[1])
  log = reporting.JsonLines(path)
  records = [{"step": step, "loss": step / 10} for step in (10, 20, 30)]
  for record in records:
    log.append(record)
  lines = storage.as_path(path).read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]
  if where == "gcs":
    assert uploads == [len(json.dumps(r, sort_keys=True)) + 1 for r in records]
  # A run resumed at step 20 drops what came after its checkpoint, once.
  resumed = reporting.JsonLines(path, resume_step=20)
  assert [r["step"] for r in resumed.records] == [10, 20]
  resumed.append({"step": 30, "loss": 3.5})
  assert [json.loads(l)["loss"] for l in storage.as_path(path).read_text().splitlines()] == [
      1.0, 2.0, 3.5]


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path):
  path = tmp_path / "train_metrics.jsonl"
  path.write_text('{"step": 4, "loss": 1.0}\n{"step": 8, "lo')
  log = reporting.JsonLines(path, resume_step=8)
  assert log.records == [{"step": 4, "loss": 1.0}]
  log.append({"step": 8, "loss": 0.5})
  assert path.read_text() == '{"loss": 1.0, "step": 4}\n{"loss": 0.5, "step": 8}\n'


def test_whole_files_on_gcs(gcs):
  path = f"{gcs.folder('files')}/summary.json"
  reporting.write_json(path, {"top1": 0.5})
  reporting.write_json(path, {"top1": 0.75})
  assert json.loads(storage.read_bytes(path)) == {"top1": 0.75}
  assert storage.exists(path) and not storage.exists(path + ".tmp")


def test_listings_on_gcs_show_what_another_client_wrote_since(gcs):
  # Orbax finds a workdir's checkpoints by listing `checkpoints/` through
  # etils; another process (a host, the run that resumed) adds steps after
  # this one first listed it. A listing answered from gcsfs's cache would
  # keep the old steps: evaluation and resume would take a stale "latest".
  import fsspec  # pylint: disable=g-import-not-at-top
  checkpoints = storage.as_path(gcs.folder("listing")) / "checkpoints"
  (checkpoints / "4").mkdir(parents=True)
  (checkpoints / "4" / "state").write_text("4")
  assert sorted(p.name for p in checkpoints.iterdir()) == ["4"]
  other = fsspec.filesystem("gs", skip_instance_cache=True)  # As another process's client.
  other.pipe(f"{checkpoints}/11/state", b"11")
  other.rm(f"{checkpoints}/4", recursive=True)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["11"]
  assert storage.exists(checkpoints / "11" / "state")
  assert not storage.exists(checkpoints / "4" / "state")


class CountingSource:
  """A TFDS-like random-access source of serialized examples, counting reads."""

  def __init__(self, names, labels):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.records = [tf.train.Example(features=tf.train.Features(feature={
        "file_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[n])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[l])),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"jpeg"])),
    })).SerializeToString() for n, l in zip(names, labels)]
    self.reads = 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, k):
    self.reads += 1
    return self.records[k]


def test_tfds_record_index_is_built_once_and_kept_on_gcs(gcs):
  names = [f"n{k:04d}_{k}.JPEG".encode() for k in range(50)]
  source = CountingSource(names, list(range(50)))
  layout = tfds_source.TFDS_LAYOUTS["imagenet_lt"]
  path = storage.as_path(gcs.folder("tfds_index")) / "train_names.npz"
  built = tfds_source.record_index(source, layout, "train", path)
  assert source.reads == 50 and storage.exists(path)
  again = tfds_source.record_index(CountingSource([], []), layout, "train", path)
  for a, b in zip(built, again):  # Read back, nothing scanned.
    np.testing.assert_array_equal(a, b)
  assert again[0].tolist() == names and again[1].tolist() == list(range(50))


def test_tfds_index_goes_next_to_the_data_or_to_cache_dir():
  import ml_collections  # pylint: disable=g-import-not-at-top
  layout = tfds_source.TFDS_LAYOUTS["inat2018"]
  cfg = ml_collections.ConfigDict(dict(cache_dir="", tfds_data_dir="gs://b/tfds"))
  assert str(tfds_source.index_path(cfg, layout, "train", "2.0.0", 437513)) == (
      "gs://b/tfds/lt_calib_index/tfds_i_naturalist2018_2.0.0_train_437513_names.npz")
  cfg.cache_dir = "gs://b/cache"
  assert str(tfds_source.index_path(cfg, layout, "train", "2.0.0", 5)).startswith(
      "gs://b/cache/tfds_i_naturalist2018")
