import torch
from matplotlib.patches import Rectangle

from diffusers_memdistill.metrics import copying_diagnostics, pixel_memorization
from diffusers_memdistill.metrics.figures import (
    plot_copying_diagnostics,
    plot_distance_heatmap,
    plot_memorized_grid,
    plot_pairing_pca,
    plot_ratio_histograms,
    plot_similarity_histograms,
)


def test_figures_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 8, 8, generator=g)
    samples = torch.cat([train[:3], torch.rand(5, 1, 8, 8, generator=g), torch.full((1, 1, 8, 8), float("nan"))])
    mem = pixel_memorization(samples, train)
    plot_ratio_histograms({"teacher": mem.ratios, "student": mem.ratios.flip(0)}, path=tmp_path / "ratio.png")
    plot_similarity_histograms({"teacher": torch.rand(9, generator=g)}, path=tmp_path / "sscd.png")
    fig = plot_memorized_grid(samples, train, mem.nn_indices, mem.ratios, num=4, path=tmp_path / "grid.png")
    assert len(fig.axes) == 12
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == f"NN1 #{int(mem.nn_indices[0, 0])}"  # an exact copy comes first

    phi_8, phi_1 = torch.randn(40, 2, 3, generator=g), torch.randn(40, 2, 3, generator=g)
    student = phi_8 + 0.1 * torch.randn(40, 2, 3, generator=g)
    plot_pairing_pca(phi_8, phi_1, student, path=tmp_path / "pca.png")
    fig = plot_distance_heatmap(phi_8, student, num=25, path=tmp_path / "heatmap.png")
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 25
    diag = copying_diagnostics(phi_8, phi_1, student, train[:, :, :2, :3])
    plot_copying_diagnostics(diag.delta, diag.mean_train_distance, path=tmp_path / "delta.png")
    for name in ("ratio", "sscd", "grid", "pca", "heatmap", "delta"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_near_duplicate_figure_shows_each_pair(tmp_path):
    from diffusers_memdistill.metrics import pixel_near_duplicates
    from diffusers_memdistill.metrics.figures import plot_near_duplicates

    g = torch.Generator().manual_seed(1)
    train = torch.rand(12, 1, 8, 8, generator=g)
    train[9] = train[2]
    dup = pixel_near_duplicates(train)
    fig = plot_near_duplicates(train, dup.pairs, dup.scores, path=tmp_path / "dup.png")
    assert [ax.get_title() for ax in fig.axes] == ["#2  score 0.000", "#9"]
    assert (tmp_path / "dup.png").stat().st_size > 1000
