"""CF stage (CKEM) unit tests: model formulas, LightGCN propagation, ranking, export, training, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ckf_dist.cf.data import Interactions, read_id_space, read_split
from ckf_dist.cf.evaluate import all_item_ranks
from ckf_dist.cf.export import CFEmbeddings, load_cf_embeddings, save_cf_embeddings
from ckf_dist.cf.lightgcn import LightGCN, normalized_adjacency
from ckf_dist.cf.mf import BPRMF, BiasedMF
from ckf_dist.cf.sgd import NegativeSampler
from ckf_dist.cf.solver import NonFiniteLossError
from ckf_dist.cf.synthetic import write_lowrank_prepared
from ckf_dist.cf.train_cf import fit, train_cf
from ckf_dist.config import CFConfig, load_config
from ckf_dist.data.schema import interactions_path
from ckf_dist.metrics import rank_of_target


@pytest.fixture
def prepared(tmp_path):
    return write_lowrank_prepared(tmp_path / "prep", num_users=30, num_items=40, per_user=10, seed=1)


def _rows(prepared, split):
    return read_split(prepared, split, read_id_space(prepared), allow_empty=True)


def test_biased_mf_matches_formula():
    m = BiasedMF(4, 5, dim=8, global_mean=3.0, init_std=0.5)
    torch.nn.init.normal_(m.user_bias.weight)
    u, i = torch.tensor([0, 3, 2]), torch.tensor([4, 0, 2])
    w = m.user.weight
    expect = torch.stack([3.0 + m.user_bias.weight[a, 0] + m.item_bias.weight[b, 0] + w[a] @ m.item.weight[b]
                          for a, b in zip(u.tolist(), i.tolist())])
    torch.testing.assert_close(m(u, i), expect)


@pytest.mark.parametrize("bias_wd", [None, 0.0, 0.7])
def test_mf_hand_gradient_matches_autograd(bias_wd):
    """add_mse_grads (the MF training step) == autograd through mse_terms, repeated ids included."""
    torch.manual_seed(0)
    m = BiasedMF(5, 6, dim=4, global_mean=3.0, init_std=0.5)
    torch.nn.init.normal_(m.user_bias.weight)
    torch.nn.init.normal_(m.item_bias.weight)
    u, i = torch.tensor([0, 3, 3, 4, 0, 1]), torch.tensor([5, 0, 2, 2, 5, 1])
    r = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0, 4.0])
    pred, l2 = m.mse_terms(u, i)
    wd, bwd = 0.3, 0.3 if bias_wd is None else bias_wd
    bias_l2 = m.user_bias.weight[u, 0] ** 2 + m.item_bias.weight[i, 0] ** 2
    loss = (((pred - r) ** 2).sum() + wd * (l2 - bias_l2).sum() + bwd * bias_l2.sum()) / 10
    loss.backward()
    expect = {n: p.grad.clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    got = m.add_mse_grads(u, i, r, wd, 10, bias_wd)
    torch.testing.assert_close(got, ((pred - r) ** 2).sum().detach() / 10)  # the data term
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, expect[n], msg=n)


def test_adam_wrapper_matches_torch_adam():
    from ckf_dist.cf.sgd import _Adam

    a, b = (torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)) for _ in range(2))
    ref = torch.optim.Adam([b], lr=0.1)
    a.grad = torch.zeros_like(a)
    ours = _Adam([a], lr=0.1)
    for k in range(3):
        ours.zero_grad()
        a.grad += torch.full_like(a, k - 1.0) * torch.arange(6.0).reshape(2, 3)
        b.grad = a.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_lightgcn_matches_dense_propagation():
    uid, iid = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 3, 0, 0, 1, 1])  # (2, 1) repeated: counts once
    U, V, K = 3, 4, 3
    m = LightGCN(U, V, dim=8, adjacency=normalized_adjacency(uid, iid, U, V), num_layers=K)
    A = torch.zeros(U + V, U + V)
    for a, b in set(zip(uid.tolist(), iid.tolist())):
        A[a, U + b] = A[U + b, a] = 1.0
    deg = A.sum(1)
    dinv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    norm = dinv[:, None] * A * dinv[None, :]
    e = torch.cat([m.user.weight, m.item.weight]).detach()
    layers = [e]
    for _ in range(K):
        layers.append(norm @ layers[-1])
    final = torch.stack(layers).mean(0)
    users, items = m.propagate()
    torch.testing.assert_close(users.detach(), final[:U])
    torch.testing.assert_close(items.detach(), final[U:])
    torch.testing.assert_close(m.full_scores(torch.tensor([1])), final[1:2] @ final[U:].T)


def test_all_item_ranks_match_bruteforce():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 9, generator=g)
    train = Interactions(torch.tensor([0, 0, 1, 2, 5]), torch.tensor([1, 2, 3, 4, 8]), torch.ones(5),
                         torch.zeros(5, dtype=torch.long))
    uid, target = torch.tensor([0, 1, 2, 5]), torch.tensor([3, 0, 4, 7])  # user 2's target is also a train item
    rank, auc_u, pos, neg = all_item_ranks(lambda u: table[u], uid, target, [train], 9)
    for n, (u, t) in enumerate(zip(uid.tolist(), target.tolist())):
        seen = {int(i) for uu, i in zip(train.uid.tolist(), train.iid.tolist()) if uu == u} - {t}
        cand = [j for j in range(9) if j not in seen]
        scores = table[u, cand]
        assert rank[n] == rank_of_target(scores.numpy(), cand.index(t))
        neg_scores = [float(table[u, j]) for j in cand if j != t]
        assert auc_u[n] == pytest.approx(sum(float(s < table[u, t]) for s in neg_scores) / len(neg_scores))
        assert pos[n] == table[u, t] and neg[n] in neg_scores  # the sampled negative is a candidate


def test_negative_sampler_avoids_positives(prepared):
    train = _rows(prepared, "train")
    s = NegativeSampler(train, 40)
    neg = s.sample(train.uid, torch.Generator().manual_seed(0))
    pos = set(zip(train.uid.tolist(), train.iid.tolist()))
    assert not any((u, j) in pos for u, j in zip(train.uid.tolist(), neg.tolist()))


@pytest.mark.parametrize("kind", ["mf", "bpr", "lightgcn"])
def test_export_roundtrip_and_scores(tmp_path, kind):
    m = BiasedMF(5, 7, dim=8) if kind == "mf" else BPRMF(5, 7, dim=8)
    t = m.tables()
    meta = {"d": 8, "model": kind, "manifest_sha256": "a" * 64, "num_users": 5, "num_items": 7,
            "idmap_sha256": "b" * 64, "rating_min": 1.0, "rating_max": 5.0}
    p = save_cf_embeddings(tmp_path / "e.safetensors", t["user"], t["item"], meta, t.get("user_bias"),
                           t.get("item_bias"), t.get("global_bias"))
    assert b"pickle" not in p.read_bytes()[:200]
    e = load_cf_embeddings(p, expected_manifest_sha="a" * 64)
    u, i = torch.tensor([0, 4, 2]), torch.tensor([6, 0, 3])
    torch.testing.assert_close(e.score(u, i), m(u, i).detach())
    if kind == "mf":
        torch.testing.assert_close(e.predict_rating(u, i), m(u, i).detach().clamp(1, 5))
    else:
        with pytest.raises(ValueError, match="predict_rating needs a biased MF"):
            e.predict_rating(u, i)
    with pytest.raises(ValueError, match="a{64}.*c{64}"):
        load_cf_embeddings(p, expected_manifest_sha="c" * 64)
    with pytest.raises(ValueError, match="iid 7 is outside the CF id map 0..6"):
        e.score(torch.tensor([0]), torch.tensor([7]))


def test_cfembeddings_is_plain_dataclass():
    e = CFEmbeddings(torch.ones(2, 8), torch.ones(3, 8), {"model": "bpr"})
    assert e.score(torch.tensor([1]), torch.tensor([2])).item() == 8.0


def test_fit_mf_beats_global_mean(tmp_path):
    prep = write_lowrank_prepared(tmp_path / "p", num_users=80, num_items=30, per_user=20, rank=2, noise=0.2)
    train, valid = _rows(prep, "train"), _rows(prep, "valid")
    res = fit(CFConfig(model="mf", dim=8, lr=0.02, weight_decay=0.05, batch_size=128, epochs=8, patience=8),
              train, valid, 80, 30)
    mean_rmse = float((valid.rating - train.rating.mean()).pow(2).mean().sqrt())
    assert res.best_valid < 0.7 * mean_rmse, (res.best_valid, mean_rmse)
    assert res.best_epoch == 1 + int(np.argmin([h["valid/rmse"] for h in res.history]))


def test_train_cf_end_to_end_exports(prepared, tmp_path):
    cfg = load_config(None, [f"data.prepared_dir={prepared}", f"log.run_dir={tmp_path / 'run'}", "cf.model=lightgcn",
                             "cf.epochs=3", "cf.batch_size=64", "log.progress=False"])
    metrics = train_cf(cfg)
    assert {"test/hr@5", "test/ndcg@5", "test/auc", "test/uauc", "test/hr@5/cold", "valid/ndcg@10"} <= set(metrics)
    sha = __import__("hashlib").sha256((prepared / "manifest.json").read_bytes()).hexdigest()
    e = load_cf_embeddings(cfg.cf_embeddings_path, expected_manifest_sha=sha)
    assert e.user.shape == (30, 8) and e.item.shape == (40, 8) and e.meta["model"] == "lightgcn"
    assert e.meta["idmap_sha256"] == read_id_space(prepared).checksum
    assert list((tmp_path / "run" / "tb" / "cf").glob("events.*"))
    assert json.loads((tmp_path / "run" / "cf" / "metrics.json").read_text())["test/hr@5"] == metrics["test/hr@5"]


def test_ids_outside_id_map_rejected(prepared):
    path = interactions_path(prepared, "train")
    t = pq.read_table(path)
    iid = t.column("iid").to_numpy().copy()
    iid[5] = 40
    pq.write_table(t.set_column(t.schema.get_field_index("iid"), "iid", pa.array(iid)), path)
    with pytest.raises(ValueError, match=r"train.parquet: row 5 has iid=40 outside the id map 0..39"):
        read_split(prepared, "train", read_id_space(prepared))


def test_empty_training_split_rejected(tmp_path):
    prep = write_lowrank_prepared(tmp_path / "p", empty_train=True)
    with pytest.raises(ValueError, match="train split has no interactions"):
        read_split(prep, "train", read_id_space(prep))
    empty = Interactions(*(torch.zeros(0, dtype=d) for d in (torch.long, torch.long, torch.float, torch.long)))
    with pytest.raises(ValueError, match="training split is empty"):
        fit(CFConfig(), empty, None, 3, 4)


def test_nan_loss_raises(prepared):
    train = _rows(prepared, "train")
    with pytest.raises(NonFiniteLossError, match="loss became (nan|inf).*lower cf.lr"):
        fit(CFConfig(model="mf", lr=1e30, epochs=3, batch_size=64), train, None, 30, 40)


def test_ml100k_reader_maps_ids_and_names_bad_lines(tmp_path):
    from ckf_dist.cf.folds import holdout, read_ml100k_file

    good = tmp_path / "u1.base"
    good.write_text("1\t1\t5\t874965758\n943\t1682\t3\t876893171\n2\t10\t4\t878542960\n")
    rows = read_ml100k_file(good)
    assert rows.uid.tolist() == [0, 942, 1] and rows.iid.tolist() == [0, 1681, 9] and rows.rating.tolist() == [5, 3, 4]
    train, valid = holdout(rows, 0.34, seed=0)
    assert len(valid) == 1 and sorted(train.uid.tolist() + valid.uid.tolist()) == sorted(rows.uid.tolist())
    bad = tmp_path / "u2.base"
    bad.write_text("1\t1\t5\t874965758\n1\t1683\t5\t874965758\n")
    with pytest.raises(ValueError, match=r"u2.base:2: user 1 / item 1683"):
        read_ml100k_file(bad)


def test_fit_mf_als_matches_sgd_band(prepared):
    """cf.solver=als reaches the SGD path's validation RMSE band on a low-rank dataset, and beats the global mean."""
    train, valid = _rows(prepared, "train"), _rows(prepared, "valid")
    base = {"model": "mf", "dim": 8, "epochs": 30, "patience": 0, "seed": 0}
    sgd = fit(CFConfig(**base, lr=0.02, weight_decay=0.01, batch_size=32), train, valid, 30, 40)
    als = fit(CFConfig(**base, solver="als", weight_decay=0.05), train, valid, 30, 40)
    mean_rmse = float((valid.rating - train.rating.mean()).pow(2).mean().sqrt())
    assert als.best_valid < mean_rmse
    assert als.best_valid <= sgd.best_valid * 1.1, (als.best_valid, sgd.best_valid)


def test_als_solver_config_checked():
    assert any("solver" in m for m in CFConfig(model="bpr", solver="als").problems("cf"))
    assert any("solver" in m for m in CFConfig(solver="newton").problems("cf"))
    assert not CFConfig(solver="als").problems("cf")
    assert any("bias_weight_decay" in m for m in CFConfig(bias_weight_decay=-0.1).problems("cf"))
    assert not CFConfig(bias_weight_decay=0.0).problems("cf")
