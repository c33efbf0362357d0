"""Grouping modes on synthetic identities (Gaussian blobs on the unit sphere): exact recovery,
strangers left unassigned, the large-N path equal to the exact one, classify, edge cases."""
import numpy as np
import pytest
import torch
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from tidyface.tasks.grouping import (OTHER, UNASSIGNED, auto, classify, cluster, grouping_log_rows,
                                     parse_clusters)


def blobs(k, per, dim=64, spread=0.05, seed=0, strangers=0):
    """k identities x per faces (cosine distance to own centre ~ spread^2 * dim / 2), plus
    isolated random points labelled -1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k + strangers, dim, generator=g), dim=1)
    y = torch.cat([torch.arange(k).repeat_interleave(per), -torch.ones(strangers, dtype=torch.long)])
    src = torch.cat([centres[:k][torch.arange(k).repeat_interleave(per)], centres[k:]])
    x = torch.nn.functional.normalize(src + spread * torch.randn(len(y), dim, generator=g), dim=1)
    return x, y.numpy()


@pytest.mark.parametrize("spec, ks", [("2-9", list(range(2, 10))), ("2,4,6", [2, 4, 6]), ("5", [5]),
                                      (" 3 - 4 , 8", [3, 4, 8]), (7, [7]), ([3, "5-6"], [3, 5, 6]),
                                      ((4, 2, 4), [2, 4])])
def test_parse_clusters(spec, ks):
    assert parse_clusters(spec) == ks


@pytest.mark.parametrize("spec, bad", [("2-x", "'2-x'"), ("9-2", "'9-2'"), ("1-4", "'1-4'"), ("", "''"),
                                       ("3,,4", "''"), ("2.5", "'2.5'"), (True, "True"), (0, "0"),
                                       ([2, None], "None")])
def test_parse_clusters_errors_name_the_bad_text(spec, bad):
    with pytest.raises(ValueError) as e:
        parse_clusters(spec)
    assert bad in str(e.value)


def test_cluster_recovers_identities_and_picks_k_by_silhouette():
    x, y = blobs(4, 30)
    g = cluster(x, "2-6", save_all=True)
    assert adjusted_rand_score(y, g.labels) == 1.0
    sil = g.details["silhouette"]
    assert g.details["chosen_k"] == 4 and max(sil, key=sil.get) == 4 and sil[4] > 0.8
    assert set(g.details["labels_per_k"]) == {2, 3, 4, 5, 6}
    assert g.details["labels_per_k"][4] == g.labels
    assert len(set(g.details["labels_per_k"][6])) == 6
    assert (g.distance < 0.2).all() and (g.details["nearest_other_distance"] > 0.6).all()
    rows = grouping_log_rows(g, [f"f{i}" for i in range(len(g))])
    assert rows[0]["k"] == 4 and rows[0]["silhouette"] == sil[4] and rows[0]["group_k2"] in ("0", "1")
    assert rows[0]["group"] == g.labels[0] and rows[0]["distance"] == g.distance[0]


def test_cluster_fewer_faces_than_k():
    x, _ = blobs(2, 2)
    g = cluster(x, "5-9")
    assert g.labels == ["0"] * 4 and "too few" in g.note and g.details["chosen_k"] == 1
    g = cluster(x, "2-9")  # k=2,3 usable, the rest skipped with a note
    assert g.details["chosen_k"] == 2 and "skipped" in g.note and len(set(g.labels)) == 2


@pytest.mark.parametrize("n", [0, 1, 2])
def test_few_faces(n):
    x, _ = blobs(1, n) if n else (torch.zeros(0, 64), None)
    for g in (cluster(x, "2-4"), auto(x)):
        assert len(g.labels) == n and g.distance.shape == (n,)
    assert cluster(x, "2-4").labels == ["0"] * n
    assert auto(x).labels == {0: [], 1: [UNASSIGNED], 2: ["0", "0"]}[n]
    assert auto(x).note if n < 2 else not auto(x).note
    c = classify(x, blobs(1, 1)[0], ["a"])
    assert c.labels == ["a"] * n and c.details["class_distance"].shape == (n, 1)


def test_identical_embeddings():
    x = torch.nn.functional.normalize(torch.ones(10, 32), dim=1)
    g = cluster(x, "2-5")
    assert g.labels == ["0"] * 10 and "do not split" in g.note
    assert auto(x).labels == ["0"] * 10
    assert auto(x, max_exact=4).labels == ["0"] * 10  # graph path, one component sampled


def test_auto_recovers_identities_and_leaves_strangers_unassigned():
    x, y = blobs(5, 20, strangers=6)
    g = auto(x)
    assert g.details["method"] == "agglomerative"
    lab = np.array(g.labels)
    assert (lab[y < 0] == UNASSIGNED).all() and (lab[y >= 0] != UNASSIGNED).all()
    assert adjusted_rand_score(y[y >= 0], lab[y >= 0]) == 1.0
    assert np.isfinite(g.distance).all()  # unassigned faces report the nearest group's distance
    assert (g.distance[y < 0] > 0.6).all() and (g.distance[y >= 0] < 0.2).all()
    names = list(map(str, range(len(y))))  # the log names the cut: chosen from the data, or given
    assert g.details["cut"] == "silhouette"
    assert grouping_log_rows(g, names)[-1]["threshold"] == g.details["threshold"]
    assert grouping_log_rows(auto(x, threshold=0.4), names)[-1]["threshold"] == 0.4
    assert all(v == UNASSIGNED for v in auto(x, threshold=0).labels)  # nothing is closer than 0


def test_auto_graph_path_equals_exact():
    # 40-d blobs wide enough that four identities chain into one 100-face graph component,
    # which average linkage must split again; plus strangers
    x, y = blobs(8, 25, dim=40, spread=0.1, seed=3, strangers=10)
    exact = auto(x, threshold=0.5)
    assert adjusted_rand_score(y, exact.labels) == 1.0
    graph = auto(x, threshold=0.5, max_exact=100, block=64)  # 210 faces > 100: graph path
    assert graph.details["method"] != exact.details["method"]
    assert graph.details["components"] == 5 + 10 and graph.details["approximate"] == 0
    assert graph.labels == exact.labels
    np.testing.assert_allclose(graph.distance, exact.distance)
    sampled = auto(x, threshold=0.5, max_exact=20, block=64)  # every component is sampled
    assert sampled.details["approximate"] == 5
    keep = y >= 0
    assert adjusted_rand_score(y[keep], np.array(sampled.labels)[keep]) == 1.0


def _partition(labels):
    """names -> ints with every unassigned face in a set of its own."""
    lab = np.array(labels, dtype=object)
    un = lab == UNASSIGNED
    lab[un] = [f"u{i}" for i in np.flatnonzero(un)]
    return np.unique(lab.astype(str), return_inverse=True)[1]


def test_auto_is_sklearn_average_linkage_on_unstructured_data():
    # uniform points on the 6-d sphere: no true clusters, so the partition depends on every merge
    x = torch.nn.functional.normalize(torch.randn(400, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                  distance_threshold=0.1).fit_predict(x.numpy())
    exact = auto(x, threshold=0.1)
    assert len(np.unique(ref)) == 265 and adjusted_rand_score(ref, _partition(exact.labels)) == 1.0
    graph = auto(x, threshold=0.1, max_exact=100, block=96)  # 193 graph components, up to 25 faces
    assert graph.details["components"] == 193 and graph.details["approximate"] == 0
    assert graph.labels == exact.labels


def test_classify_references_and_other():
    x, y = blobs(3, 10, strangers=4)
    # two references per class: faces of the class (the rest of the class are queries)
    ref = torch.cat([x[0:2], x[10:12], x[20:22]])
    names = ["ann", "ann", "bob", "bob", "cy", "cy"]
    g = classify(x, ref, names)
    assert g.details["classes"] == ["ann", "bob", "cy"]
    want = np.array(["ann", "bob", "cy"])[np.clip(y, 0, None)]
    assert (np.array(g.labels)[y >= 0] == want[y >= 0]).all()
    d = g.details["class_distance"]
    brute = 1 - (x @ ref.T).double().numpy()
    np.testing.assert_allclose(d, np.stack([brute[:, 0:2].min(1), brute[:, 2:4].min(1), brute[:, 4:6].min(1)], 1),
                               atol=1e-6)
    np.testing.assert_allclose(g.distance, d.min(1))
    o = classify(x, ref, names, other_threshold=0.5)
    lab = np.array(o.labels)
    assert (lab[y < 0] == OTHER).all() and (lab[y >= 0] == want[y >= 0]).all()
    assert o.details["nearest_class"][-1] in ("ann", "bob", "cy")
    row = grouping_log_rows(o, [f"f{i}" for i in range(len(y))])[-1]
    assert row["group"] == OTHER and row["distance_bob"] == d[-1, 1] and row["distance"] >= 0.5
    assert classify(x, ref, names, other_threshold=0).labels == [OTHER] * len(y)
    with pytest.raises(ValueError, match="reference labels"):
        classify(x, ref, names[:-1])
    with pytest.raises(ValueError, match="other_threshold"):
        classify(x, ref, names, other_threshold=-0.5)
