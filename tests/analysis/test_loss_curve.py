"""The loss plot monitor: log.csv drawn as loss.png at the end of a run."""

from types import SimpleNamespace

from objcrop.analysis.loss_curve import LossPlot, plot_loss_log


def test_plot_loss_log_draws_a_png_or_nothing(tmp_path):
    assert plot_loss_log(tmp_path / "log.csv", tmp_path / "none.png") is None  # no log yet
    (tmp_path / "log.csv").write_text("step,loss,lr\n", encoding="utf-8")
    assert plot_loss_log(tmp_path / "log.csv", tmp_path / "empty.png") is None  # a header only
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "empty.png").exists()
    (tmp_path / "log.csv").write_text("step,loss,lr\n1,6.2,0.1\n2,5.9,0.1\n", encoding="utf-8")
    png = plot_loss_log(tmp_path / "log.csv", tmp_path / "loss.png")
    assert png == tmp_path / "loss.png" and png.read_bytes().startswith(b"\x89PNG")


def test_loss_plot_writes_into_the_runs_folder_at_the_end(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss\n1,3.0\n2,2.5\n3,2.0\n", encoding="utf-8")
    monitor = LossPlot()
    assert monitor.on_epoch_end(SimpleNamespace(out=tmp_path)) == {}  # nothing to log per epoch
    monitor.on_fit_end(SimpleNamespace(out=tmp_path))
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_loss_png_is_marked_and_an_older_one_in_the_run_folder_is_replaced(tmp_path):
    from PIL import Image

    from objcrop.analysis.png import png_is_ours

    (tmp_path / "log.csv").write_text("step,loss\n1,3.0\n2,2.5\n", encoding="utf-8")
    Image.new("RGB", (4, 4)).save(tmp_path / "loss.png")  # e.g. drawn before objcrop marked its PNGs
    png = plot_loss_log(tmp_path / "log.csv", tmp_path / "loss.png")  # the run folder is objcrop's
    assert png_is_ours(png)
