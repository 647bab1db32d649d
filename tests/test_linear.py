"""featurekit.linear against scikit-learn on its bundled digits (1,797 x 64, 10 classes), standardised."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featurekit.heads import solver as linear
from featurekit.heads.selection import SELECT_RULES, improved, path_patience


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X, y, torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y)


def fit_one(X, y, C, loss, **options):
    return next(linear.fit_path(X, y, [C], loss, **options))


def test_logistic_matches_sklearn_lbfgs(digits):
    X, y, Xt, yt = digits
    reference = LogisticRegression(C=0.1, tol=1e-8, max_iter=100_000).fit(X, y)
    fit = fit_one(Xt, yt, 0.1, "logistic", tol=1e-5)
    assert fit.converged
    coef = fit.coef.double().numpy()
    assert np.abs(coef - reference.coef_).max() < 3e-3 * np.abs(reference.coef_).max()
    np.testing.assert_allclose(fit.predict_proba(Xt).numpy(), reference.predict_proba(X), atol=2e-3)
    at_reference = linear.objective(Xt.double(), yt, torch.from_numpy(reference.coef_),
                                    torch.from_numpy(reference.intercept_), 0.1, "logistic")
    assert fit.objective == pytest.approx(at_reference, rel=1e-5)


def test_squared_hinge_matches_linear_svc_with_a_negligible_intercept_penalty(digits):
    # liblinear penalises the intercept as a feature of value intercept_scaling; at 100 that penalty
    # is 1e-4 of ours on the same coefficient, which makes LinearSVC solve our objective
    X, y, Xt, yt = digits
    reference = LinearSVC(C=0.01, tol=1e-8, max_iter=100_000, intercept_scaling=100, dual=False).fit(X, y)
    fit = fit_one(Xt, yt, 0.01, "squared_hinge", tol=1e-7)  # scores to 0.02 need more than 1e-5 of the objective
    assert fit.converged
    at_reference = linear.objective(Xt.double(), yt, torch.from_numpy(reference.coef_),
                                    torch.from_numpy(reference.intercept_), 0.01, "squared_hinge")
    assert fit.objective == pytest.approx(at_reference, rel=1e-5)
    scores = fit.decision_function(Xt).double().numpy()
    np.testing.assert_allclose(scores, reference.decision_function(X), atol=0.02)
    assert (scores.argmax(axis=1) == reference.predict(X)).mean() >= 0.999


@pytest.mark.parametrize("loss", linear.LOSSES)
def test_warm_path_reaches_the_cold_solutions_in_fewer_iterations(digits, loss):
    _, _, Xt, yt = digits
    Cs = np.logspace(-3, 0, 13)
    warm = list(linear.fit_path(Xt, yt, Cs, loss, tol=1e-5))
    cold = [fit_one(Xt, yt, C, loss, tol=1e-5) for C in Cs]
    for w, c in zip(warm, cold):
        assert w.converged and c.converged
        assert w.objective == pytest.approx(c.objective, rel=1e-5)
        assert (w.coef - c.coef).abs().max() < 1e-2 * c.coef.abs().max()
        assert (w.decision_function(Xt).argmax(1) != c.decision_function(Xt).argmax(1)).sum() <= 2
    assert sum(w.n_iter for w in warm[1:]) < 0.75 * sum(c.n_iter for c in cold[1:])
    assert sum(w.n_passes for w in warm[1:]) < 0.75 * sum(c.n_passes for c in cold[1:])


@pytest.mark.parametrize("loss", linear.LOSSES)
def test_path_is_deterministic_on_cpu(digits, loss):
    _, _, Xt, yt = digits
    runs = [list(linear.fit_path(Xt, yt, [1e-3, 1e-2, 1e-1], loss)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept) and a.n_iter == b.n_iter


def test_fit_temperature_recovers_the_temperature_that_drew_the_labels():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(20_000, 6, generator=generator, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(2.5 * scores, dim=1), 1, generator=generator)[:, 0]
    assert linear.fit_temperature(scores, targets) == pytest.approx(2.5, rel=0.05)
    true_loss = linear.log_loss(scores, targets, 2.5)
    assert linear.cross_fitted_log_loss(scores, targets) == pytest.approx(true_loss, abs=0.01)
    assert linear.log_loss(scores, targets, 1.0) > true_loss + 0.05


@pytest.mark.parametrize("rows", [10, 100])
def test_scores_that_separate_the_rows_get_a_finite_temperature_and_no_zero_log_loss(rows):
    targets = torch.arange(rows) % 4
    noise = 0.3 * torch.randn(rows, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = 3 * F.one_hot(targets, 4).double() + noise  # every row's own class scores highest
    a = linear.fit_temperature(scores, targets)
    assert a < 10  # not the bracket's end (~750 here), where probabilities round to 0 and 1
    own = float(torch.softmax(a * scores, dim=1).gather(1, targets[:, None]).mean())
    assert own == pytest.approx((rows + 1) / (rows + 2), abs=0.01)  # the rule of succession
    assert linear.cross_fitted_log_loss(scores, targets) > 0.01


@pytest.mark.parametrize("loss", linear.LOSSES)
def test_the_default_rule_keeps_the_lowest_log_loss_within_one_standard_error_of_the_best_accuracy(digits, loss):
    _, _, Xt, yt = digits
    train, valid = torch.arange(len(yt)) % 3 != 0, torch.arange(len(yt)) % 3 == 0
    best, records = linear.select_on_validation(linear.fit_path(Xt[train], yt[train], np.logspace(-5, 4, 37), loss),
                                                Xt[valid], yt[valid])
    top = max(r["val_accuracy"] for r in records)
    floor = top - np.sqrt(top * (1 - top) / int(valid.sum()))
    within = [r for r in records if r["val_accuracy"] >= floor]
    assert best.C == min(within, key=lambda r: r["val_log_loss"])["C"]
    kept = next(r for r in records if r["C"] == best.C)
    assert kept["val_log_loss"] <= min(r["val_log_loss"] for r in records if r["val_accuracy"] == top)


@pytest.mark.parametrize("select", SELECT_RULES)
def test_by_default_the_path_stops_the_rules_patience_past_its_last_improvement(digits, select):
    _, _, Xt, yt = digits
    train, valid = torch.arange(len(yt)) % 3 != 0, torch.arange(len(yt)) % 3 == 0
    Cs = np.logspace(-5, 4, 37)
    _, records = linear.select_on_validation(linear.fit_path(Xt[train], yt[train], Cs, "logistic", tol=1e-2),
                                             Xt[valid], yt[valid], select=select)
    rows = int(valid.sum())
    last = max(i for i in range(len(records)) if improved(records[:i + 1], select, rows))
    assert len(records) == last + 1 + path_patience(select) < len(Cs)
    assert path_patience(select) == (3 if select in ("accuracy-1se", "log-loss") else 5)


@pytest.mark.parametrize("loss", linear.LOSSES)
def test_selection_stops_once_validation_has_peaked_and_keeps_the_best(digits, loss):
    _, _, Xt, yt = digits
    train, valid = torch.arange(len(yt)) % 3 != 0, torch.arange(len(yt)) % 3 == 0
    Cs = np.logspace(-5, 4, 37)
    consumed = []
    path = (consumed.append(fit.C) or fit for fit in linear.fit_path(Xt[train], yt[train], Cs, loss, tol=1e-4))
    best, records = linear.select_on_validation(path, Xt[valid], yt[valid], patience=4, select="accuracy")
    assert len(consumed) == len(records) < len(Cs)
    winner = max(records, key=lambda r: (r["val_accuracy"], -r["val_log_loss"]))
    assert best.C == winner["C"] and winner["val_accuracy"] > 0.9
    assert all(r["val_accuracy"] <= winner["val_accuracy"] for r in records[-4:])
    right = (best.decision_function(Xt[valid]).argmax(1) == yt[valid]).double()
    recall = [float(right[yt[valid] == k].mean()) for k in range(10)]
    assert winner["val_balanced_accuracy"] == pytest.approx(np.mean(recall), abs=1e-12)
    proba = best.predict_proba(Xt[valid])
    assert proba.dtype == torch.float64 and torch.allclose(proba.sum(1), torch.ones(len(proba), dtype=torch.float64))
    if loss == "squared_hinge":
        scores = best.decision_function(Xt[valid])
        assert best.temperature == linear.fit_temperature(scores, yt[valid])
        assert winner["val_log_loss"] == linear.cross_fitted_log_loss(scores, yt[valid])


def test_out_of_fold_scores_come_from_fits_that_did_not_see_the_row(digits):
    _, _, Xt, yt = digits
    fit = fit_one(Xt, yt, 10.0, "squared_hinge")
    seen = float((fit.decision_function(Xt).argmax(1) == yt).double().mean())
    held_out = float((linear.out_of_fold_scores(Xt, yt, fit, folds=3).argmax(1) == yt).double().mean())
    assert seen >= 0.995 and 0.9 < held_out < seen - 0.01


def test_float64_features_give_the_float32_solution(digits):
    _, _, Xt, yt = digits
    single = fit_one(Xt, yt, 0.1, "logistic", tol=1e-5)
    double = fit_one(Xt.double(), yt, 0.1, "logistic", tol=1e-5)
    assert double.coef.dtype == torch.float64
    assert double.objective == pytest.approx(single.objective, rel=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda X, y: fit_one(X, y, 1.0, "hinge"), "unknown loss 'hinge'"),
    (lambda X, y: fit_one(X, y, 0.0, "logistic"), "every C must be positive"),
    (lambda X, y: fit_one(X, y, 1.0, "logistic", n_classes=5), "targets must lie in 0..4"),
    (lambda X, y: fit_one(X, y.int(), 1.0, "logistic"), "targets must be int64"),
    (lambda X, y: fit_one(X[0], y, 1.0, "logistic"), "features must be a 2-D float tensor"),
])
def test_bad_input_is_one_clear_error(digits, call, message):
    _, _, Xt, yt = digits
    with pytest.raises(ValueError, match=message):
        call(Xt, yt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", linear.LOSSES)
def test_cuda_fit_matches_cpu(digits, loss):
    _, _, Xt, yt = digits
    cpu = fit_one(Xt, yt, 0.1, loss, tol=1e-5)
    cuda = fit_one(Xt.cuda(), yt.cuda(), 0.1, loss, tol=1e-5)
    assert cuda.coef.is_cuda and cuda.objective == pytest.approx(cpu.objective, rel=1e-5)


def test_the_sweep_scores_log_loss_as_every_head_and_report_does():
    # a confidently wrong validation row (probability ~e^-200) counts as PROBABILITY_FLOOR, as in
    # proba_scores, the MLP's epochs and the reports: the kept C's record equals the kept model's score
    from featurekit.heads.base import proba_scores
    from featurekit.heads.selection import PROBABILITY_FLOOR

    fit = linear.LinearFit(1.0, "logistic", 100 * torch.eye(2), torch.zeros(2), 1, 1.0, True, 0.0)
    X_val, y_val = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])
    scored = linear.validation_scores(fit, X_val, y_val)
    expected = proba_scores(fit.predict_proba(X_val).double().numpy(), y_val.numpy())
    assert scored["val_log_loss"] == pytest.approx(expected["val_log_loss"], rel=1e-9)
    assert scored["val_log_loss"] == pytest.approx(-np.log(PROBABILITY_FLOOR) / 3, rel=1e-6)  # not 200 / 3
    assert (scored["val_accuracy"], scored["val_balanced_accuracy"]) == (expected["val_accuracy"],
                                                                         expected["val_balanced_accuracy"])
