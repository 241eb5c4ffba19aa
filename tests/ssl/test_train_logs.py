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
