import re

import numpy as np
import pytest
import torch
from conftest import blobs
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurekit.errors import HeadError, SettingsError
from featurekit.heads import mlp
from featurekit.heads.head_file import load_head, save_head
from featurekit.heads.knn import KNNHead
from featurekit.heads.linear import LinearSVMHead, LogisticHead
from featurekit.heads.mlp import MLPHead, build_mlp
from featurekit.heads.registry import HEADS, make_head

FAST = {"mlp": {"hidden_sizes": (32,), "max_epochs": 20, "patience": 5, "batch_size": 45}}


@pytest.fixture(scope="module")
def separable():
    labels = np.repeat(np.arange(3), 30)
    X = blobs(np.concatenate([labels, labels]), dim=12, seed=0, spread=0.5)
    y = np.array([10, 20, 30])[labels]  # labels need not be 0..C-1
    return X[:90], y, X[90:], y


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_learns_separable_problem_and_reloads_identically(kind, separable, tmp_path):
    X, y, X_val, y_val = separable
    head = make_head(kind, **FAST.get(kind, {})).fit(X, y, X_val, y_val)
    assert (head.predict(X_val) == y_val).mean() == 1.0
    proba = head.predict_proba(X_val)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(head.classes_, [10, 20, 30])
    grid = head._grid()
    tried = [entry[head.grid_param] for entry in head.selection_]
    assert tried == grid[:len(tried)]  # the linear heads' path stops C_patience values past the best
    assert head.best_params_[head.grid_param] in grid
    save_head(tmp_path / "head.h5", head, {"note": kind})
    loaded, metadata = load_head(tmp_path / "head.h5")
    assert metadata == {"note": kind} and type(loaded) is type(head)
    assert loaded.get_params() == head.get_params() and loaded.selection_ == head.selection_
    np.testing.assert_array_equal(loaded.predict_proba(X_val), proba)
    np.testing.assert_array_equal(loaded.predict(X_val), head.predict(X_val))


def test_init_only_stores_parameters():
    for cls in HEADS.values():
        head = cls()
        assert not [name for name in vars(head) if name.endswith("_")]
        assert set(vars(head)) == set(head.get_params())


def test_standardisation_is_fitted_on_train_rows_only(separable):
    X, y, X_val, y_val = separable
    head = make_head("logreg").fit(X, y, X_val + 100.0, y_val)
    np.testing.assert_allclose(head.scaler_.mean_, X.mean(axis=0), rtol=1e-5)


def test_selection_picks_the_grid_value_with_best_validation_score(separable):
    X, y, X_val, y_val = separable
    rng = np.random.default_rng(0)
    noisy = X + rng.normal(scale=4.0, size=X.shape).astype(np.float32)
    head = make_head("logreg", C_grid=(1e-6, 1.0)).fit(noisy, y, X_val, y_val)
    by_value = {entry["C"]: entry for entry in head.selection_}
    winner = max(head.selection_, key=lambda e: (e["val_accuracy"], -e["val_log_loss"]))
    assert head.best_params_ == {"C": winner["C"]}
    assert by_value[1.0]["val_log_loss"] < by_value[1e-6]["val_log_loss"]  # C=1e-6 is nearly uniform


def test_mlp_layers_follow_the_recipe():
    layers = [type(m).__name__ for m in build_mlp(8192, (1000,), 2, 0.5)]
    assert layers == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_mlp_early_stopping_keeps_best_epoch(separable):
    X, y, X_val, y_val = separable
    misleading = {10: 20, 20: 30, 30: 10}  # validation disagrees with train: learning makes it worse
    y_bad = np.array([misleading[v] for v in y_val])
    head = MLPHead(hidden_sizes=(16,), max_epochs=40, patience=3, weight_decay_grid=(0.0,), batch_size=16,
                   select="accuracy", precision="fp32")  # fp32: the kept epoch's scores, exactly
    head.fit(X, y, X_val, y_bad)
    scores = [(r["val_accuracy"], -r["val_log_loss"]) for r in head.history_]
    best = scores.index(max(scores))
    assert len(head.history_) == best + 1 + 3 < 40
    kept = head._scores(head.model_, (head._scale(X_val), np.searchsorted(head.classes_, y_bad)))
    assert kept["val_log_loss"] == pytest.approx(head.history_[best]["val_log_loss"])
    assert kept["val_log_loss"] < head.history_[-1]["val_log_loss"]


def test_mlp_precision_is_bf16_where_the_device_computes_it_and_recorded(separable):
    from featurekit.devices import auto_precision

    X, y, X_val, y_val = separable
    fitted = {precision: MLPHead(hidden_sizes=(32,), max_epochs=8, batch_size=16, precision=precision).fit(
        X, y, X_val, y_val) for precision in ("auto", "fp32", "bf16")}
    assert fitted["auto"].precision_ == auto_precision("cpu") and fitted["fp32"].precision_ == "fp32"
    for head in fitted.values():  # the fitted module computes in float32 whatever trained it
        assert all(p.dtype == torch.float32 for p in head.model_.parameters())
        assert (head.predict(X_val) == y_val).mean() == 1.0
    assert not torch.equal(fitted["bf16"].model_[1].weight, fitted["fp32"].model_[1].weight)


def test_mlp_without_validation_trains_max_epochs_and_is_seeded(separable):
    X, y, _, _ = separable
    first = MLPHead(hidden_sizes=(8,), max_epochs=3, batch_size=32).fit(X, y)
    second = MLPHead(hidden_sizes=(8,), max_epochs=3, batch_size=32).fit(X, y)
    assert len(first.history_) == 3 and first.best_params_ == {"weight_decay": 0.0}
    for a, b in zip(first.model_.state_dict().values(), second.model_.state_dict().values()):
        assert torch.equal(a, b)


def test_validation_labels_outside_training_classes_are_refused(separable):
    X, y, X_val, y_val = separable
    with pytest.raises(ValueError, match=r"validation labels \[99\]"):
        make_head("knn").fit(X, y, X_val, np.where(y_val == 30, 99, y_val))


def test_wrong_feature_width_is_refused(separable):
    X, y, X_val, y_val = separable
    head = make_head("knn").fit(X, y)
    with pytest.raises(ValueError, match="X has 11 features, but KNNHead is expecting 12 features"):
        head.predict(X_val[:, :11])


# scikit-learn's own estimator checks, every one of them. Two skip themselves here, by sklearn's
# choice: check_array_api_input (SCIPY_ARRAY_API unset) and check_classifier_data_not_an_array
# (pandas is not a featurekit dependency). The MLP is smaller than the default so 55 fits stay quick.
@parametrize_with_checks([LogisticHead(), KNNHead(), KNNHead(protocol="dino"), LinearSVMHead(),
                          MLPHead(hidden_sizes=(64,), max_epochs=30)])
def test_heads_pass_sklearn_check_estimator(estimator, check):
    check(estimator)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_fit_never_changes_its_parameters_and_the_chosen_value_is_a_fitted_attribute(kind, separable):
    # scikit-learn's rule (issue 21): a sweep used to write the chosen C into C, so a later fit(X, y) trained there
    X, y, X_val, y_val = separable
    head = make_head(kind, **FAST.get(kind, {}))
    given = head.get_params()
    head.fit(X, y, X_val, y_val)
    assert head.get_params() == given
    chosen = head.best_params_[head.grid_param]
    assert getattr(head, f"{head.grid_param}_") == chosen
    again = clone(head).fit(X, y)  # no validation rows: the parameter as given, no sweep
    assert again.best_params_ == {head.grid_param: given[head.grid_param]} and len(again.selection_) == 1
    chosen_model = clone(head).set_params(**head.best_params_).fit(X, y)
    assert getattr(chosen_model, f"{head.grid_param}_") == chosen


@pytest.mark.parametrize("kind", ["logreg", "svm"])
@pytest.mark.parametrize("classes", [2, 3])
def test_linear_heads_give_coef_and_intercept_in_the_callers_feature_space(kind, classes, separable):
    X, y, X_val, y_val = separable
    keep, keep_val = y <= [0, 20, 30][classes - 1], y_val <= [0, 20, 30][classes - 1]
    X, y, X_val = X[keep] * 7.0 + 3.0, y[keep], X_val[keep_val] * 7.0 + 3.0  # far from standardised
    head = make_head(kind).fit(X, y)
    decision = head.decision_function(X_val)
    assert head.coef_.shape == ((1 if classes == 2 else classes), X.shape[1]) and head.intercept_.shape == (
        1 if classes == 2 else classes,)
    np.testing.assert_allclose(decision, (X_val @ head.coef_.T + head.intercept_).squeeze(), rtol=1e-4, atol=1e-4)
    predicted = head.classes_[(decision > 0).astype(int)] if classes == 2 else head.classes_[decision.argmax(1)]
    np.testing.assert_array_equal(predicted, head.predict(X_val))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_balanced_class_weights_lift_the_rare_class(kind):
    # 90 rows of class 0, 10 of class 1, overlapping: unweighted heads favour class 0; balanced ones recall class 1
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], [90, 10])
    X = (rng.normal(size=(100, 6)) + 0.8 * y[:, None]).astype(np.float32)
    y_val = np.repeat([0, 1], [200, 200])
    X_val = (rng.normal(size=(400, 6)) + 0.8 * y_val[:, None]).astype(np.float32)
    params = {**FAST.get(kind, {}), **({"n_neighbors": 30} if kind == "knn" else {})}
    recall = {weight: (make_head(kind, class_weight=weight, **params).fit(X, y).predict(X_val)[200:] == 1).mean()
              for weight in (None, "balanced")}
    assert recall["balanced"] > recall[None] + 0.1


def test_unknown_head_parameters_are_an_error():
    with pytest.raises(SettingsError, match=r"logreg head takes no parameter 'hidden_sizes' \(logreg: C, C_grid"):
        make_head("logreg", hidden_sizes=(10,))
    with pytest.raises(SettingsError, match="unknown head 'forest'"):
        make_head("forest")


def test_knn_probabilities_are_smoothed_never_hard(separable):
    X, y, X_val, y_val = separable
    head = KNNHead(n_neighbors=1).fit(X, y)
    proba = head.predict_proba(X_val)
    assert (head.predict(X_val) == y_val).all()
    assert proba.max() < 1.0 and proba.min() > 0.0  # 1-NN: (1 + 1/3) / (1 + 1) for the winner
    np.testing.assert_allclose(proba.max(axis=1), 2 / 3)


def test_knn_scores_every_k_from_one_neighbour_search_as_each_k_alone_would(separable):
    X, y, X_val, y_val = separable
    rng = np.random.default_rng(1)
    noisy, noisy_val = (a + rng.normal(scale=3.0, size=a.shape).astype(np.float32) for a in (X, X_val))
    head = KNNHead(n_neighbors_grid=(1, 5, 20, 500)).fit(noisy, y, noisy_val, y_val)
    for entry in head.selection_:
        alone = KNNHead(n_neighbors=entry["n_neighbors"]).fit(noisy, y)
        scores = alone._scores(alone.model_, (alone._scale(noisy_val), np.searchsorted(alone.classes_, y_val)))
        assert scores["val_accuracy"] == entry["val_accuracy"]
        assert scores["val_log_loss"] == pytest.approx(entry["val_log_loss"], rel=1e-12)


def test_one_class_is_a_one_line_head_error(separable):
    X, y, _, _ = separable
    with pytest.raises(HeadError, match=r"^logreg head: the training rows hold 1 class \(10\); "
                                        r"a classifier needs at least 2$"):
        LogisticHead().fit(X[:30], y[:30])


@pytest.mark.parametrize("kind, params, message", [
    ("mlp", {"max_epochs": 0}, "mlp head: max_epochs must be at least 1 (got 0)"),
    ("mlp", {"hidden_sizes": (0,)}, "mlp head: hidden_sizes must be at least 1 (got 0)"),
    ("mlp", {"lr": 0.0}, "mlp head: lr must be more than 0 (got 0)"),
    ("logreg", {"C_grid": (1.0, -1.0)}, "logreg head: C_grid must be more than 0 (got -1)"),
    ("knn", {"n_neighbors": 0}, "knn head: n_neighbors must be at least 1 (got 0)"),
])
def test_parameter_values_that_cannot_work_are_refused_before_fitting(separable, kind, params, message):
    X, y, _, _ = separable
    with pytest.raises(SettingsError, match=f"^{re.escape(message)}$"):
        make_head(kind, **params).fit(X, y)


def test_mlp_batch_size_auto_keeps_sixteen_steps_per_epoch(separable, monkeypatch):
    assert [MLPHead().batch_size_for(n) for n in (5000, 4095, 2048, 245)] == [256, 128, 128, 64]
    assert MLPHead(batch_size=32).batch_size_for(5000) == 32
    used = []
    real_epoch = mlp.train_epoch
    monkeypatch.setattr(mlp, "train_epoch", lambda *args: used.append(args[4]) or real_epoch(*args))
    MLPHead(max_epochs=2, hidden_sizes=(8,)).fit(*separable[:2])
    assert used == [64, 64]  # 90 rows: batches of 64, the smallest auto size
    with pytest.raises(SettingsError, match=r"^mlp head: batch_size must be a number or auto \(got 'big'\)$"):
        MLPHead(batch_size="big").fit(*separable[:2])


def test_the_cpu_dropout_drops_at_its_rate_and_keeps_the_mean():
    from featurekit.heads.mlp import Dropout

    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    for p in (0.5, 0.2):
        layer = Dropout(p).train()
        out = layer(x)
        dropped = (out == 0).float().mean().item()
        assert abs(dropped - p) < 0.005 and torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
        assert abs(out.mean().item() - 1.0) < 0.01
        torch.manual_seed(1)
        first = layer(x)
        torch.manual_seed(1)
        assert torch.equal(first, layer(x)) and not torch.equal(first, layer(x))  # seeded, fresh each call
    assert torch.equal(Dropout(0.5).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
