"""The pretraining logs: rows kept up to the resumed step, eval rows, rank 0 only."""

import csv

from objcrop.ssl.train_logs import TrainLogs


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_the_rows_up_to_its_step(tmp_path):
    logs = TrainLogs(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    for step in range(1, 5):
        logs.write(step, {"loss": 1.0 / step, "lr": 0.1})
    logs.close()
    resumed = TrainLogs(tmp_path, enabled=True, tensorboard=False, resume_step=2)
    resumed.write(3, {"loss": 0.5, "lr": 0.1, "new_column": 1.0})  # columns stay the first row's
    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "log.csv")] == [("1", "1"), ("2", "0.5"), ("3", "0.5")]
    assert list(rows(tmp_path / "log.csv")[0]) == ["step", "loss", "lr"]


def test_eval_rows_and_a_disabled_log_writes_nothing(tmp_path):
    logs = TrainLogs(tmp_path / "main", enabled=True, tensorboard=False, resume_step=0)
    logs.write_eval(6, 1, {"knn_map@20": 31.25})
    logs.write_eval(12, 2, {"knn_map@20": 33.5})
    assert rows(tmp_path / "main" / "eval.csv") == [
        {"step": "6", "epoch": "1", "knn_map@20": "31.2500"},
        {"step": "12", "epoch": "2", "knn_map@20": "33.5000"},
    ]
    other_rank = TrainLogs(tmp_path / "rank1", enabled=False, tensorboard=False, resume_step=0)
    other_rank.write(1, {"loss": 1.0})
    other_rank.write_eval(6, 1, {"knn_map@20": 1.0})
    assert not (tmp_path / "rank1").exists()


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_train_and_eval_scalar_and_a_resume_purges_the_later_steps(tmp_path):
    logs = TrainLogs(tmp_path, enabled=True, tensorboard=True, resume_step=0)
    for step in (1, 2, 3):
        logs.write(step, {"loss": float(step), "lr": 0.5})
    logs.write_eval(3, 1, {"knn_map": 40.0})
    logs.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)] and len(scalars["train/lr"]) == 3
    assert scalars["eval/knn_map"] == [(3, 40.0)]
    # A run resumed from step 1 writes steps 2-3 again: the reader keeps the new values, not both.
    logs = TrainLogs(tmp_path, enabled=True, tensorboard=True, resume_step=1)
    for step in (2, 3):
        logs.write(step, {"loss": 10.0 * step, "lr": 0.5})
    logs.close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
