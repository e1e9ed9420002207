"""The reference for ``clipeval.sequential``: the betting confidence sequence as its authors
wrote it, from confseq 0.0.11 (src/confseq/betting.py and betting_strategies.py, MIT License,
Copyright (c) 2021 confseq developers; https://github.com/gostevehoward/confseq). Trimmed to
the functions the betting tests for sampling without replacement use (``lambda_aKelly`` from
betting_strategies.py; the others as the hedged-capital sequence uses them), otherwise
unchanged: confseq itself does not install here (its build needs Boost), and this is the code
the tests compare with, not code clipeval runs."""

import math

import numpy as np


def lambda_predmix_eb(x, truncation=math.inf, alpha=0.05, fixed_n=None, prior_mean=1 / 2, prior_variance=1 / 4,
                      fake_obs=1, scale=1):
    t = np.arange(1, len(x) + 1)
    mu_hat_t = np.minimum((fake_obs * prior_mean + np.cumsum(x)) / (t + fake_obs), 1)
    mu_hat_tminus1 = np.append(prior_mean, mu_hat_t[0 : (len(x) - 1)])  # noqa: F841 (as in confseq)
    sigma2_t = (fake_obs * prior_variance + np.cumsum(np.power(x - mu_hat_t, 2))) / (t + fake_obs)
    sigma2_tminus1 = np.append(prior_variance, sigma2_t[0 : (len(x) - 1)])
    if fixed_n is None:
        lambdas = np.sqrt(2 * np.log(1 / alpha) / (t * np.log(1 + t) * sigma2_tminus1))
    else:
        lambdas = np.sqrt(2 * np.log(1 / alpha) / (fixed_n * sigma2_tminus1))
    lambdas[np.isnan(lambdas)] = 0
    lambdas = np.minimum(truncation, lambdas)
    return lambdas * scale


def lambda_aKelly(x, m, prior_mean=1 / 2, prior_variance=1 / 4, fake_obs=1, N=None, trunc_scale=1):
    assert trunc_scale > 0 and trunc_scale <= 1
    t = np.arange(1, len(x) + 1)
    S_t = np.cumsum(x)  # noqa: F841 (as in confseq)
    x_tminus1 = np.append(0, x[0 : (len(x) - 1)])
    S_tminus1 = np.cumsum(x_tminus1)
    mu_hat_t = (fake_obs * prior_mean + np.cumsum(x)) / (t + fake_obs)
    mu_hat_tminus1 = np.append(prior_mean, mu_hat_t[0 : (len(x) - 1)])
    V_t = (fake_obs * prior_variance + np.cumsum(np.power(x - mu_hat_t, 2))) / (t + fake_obs)
    V_tminus1 = np.append(prior_variance, V_t[0 : (len(x) - 1)])
    if N is not None:
        conditional_mu_hat_tminus1 = (N * mu_hat_tminus1 - S_tminus1) / (N - t + 1)
        mu_t = (N * m - S_tminus1) / (N - (t - 1))
    else:
        conditional_mu_hat_tminus1 = mu_hat_tminus1
        mu_t = m
    lambdas = (conditional_mu_hat_tminus1 - mu_t) / (V_tminus1 + np.power(conditional_mu_hat_tminus1 - mu_t, 2))
    lambdas = np.maximum(-trunc_scale / (1 - mu_t), lambdas)
    lambdas = np.minimum(trunc_scale / mu_t, lambdas)
    return lambdas


def betting_mart(x, m, alpha=0.05, lambdas_fn_positive=None, lambdas_fn_negative=None, N=None, convex_comb=False,
                 theta=1 / 2, trunc_scale=1 / 2, m_trunc=True):
    assert 0 <= theta <= 1
    if lambdas_fn_positive is None:
        lambdas_fn_positive = lambda x, m: lambda_predmix_eb(x, alpha=alpha * theta)  # noqa: E731
    if lambdas_fn_negative is None:
        lambdas_fn_negative = lambda x, m: lambda_predmix_eb(x, alpha=alpha * (1 - theta))  # noqa: E731
    if N is not None:
        t = np.arange(1, len(x) + 1)
        S_t = np.cumsum(x)
        S_tminus1 = np.append(0, S_t[0 : (len(x) - 1)])
        mu_t = (N * m - S_tminus1) / (N - (t - 1))
    else:
        mu_t = np.repeat(m, len(x))
    assert 0 < trunc_scale <= 1
    if theta > 0:
        lambdas_positive = lambdas_fn_positive(x, m)
        if m_trunc:
            with np.errstate(divide="ignore"):
                lambdas_positive = np.minimum(lambdas_positive, trunc_scale / mu_t)
                lambdas_positive = np.maximum(lambdas_positive, -trunc_scale / (1 - mu_t))
        else:
            lambdas_positive = np.minimum(lambdas_positive, trunc_scale)
            lambdas_positive = np.maximum(lambdas_positive, -trunc_scale)
        with np.errstate(invalid="ignore"):
            multiplicand_positive = 1 + lambdas_positive * (x - mu_t)
        multiplicand_positive[np.logical_and(lambdas_positive == math.inf, x - mu_t == 0)] = 1
        with np.errstate(invalid="ignore"):
            capital_process_positive = np.cumprod(multiplicand_positive)
        capital_process_positive[np.isnan(capital_process_positive)] = 0
    else:
        capital_process_positive = np.repeat(0, len(x))
    if theta < 1:
        lambdas_negative = lambdas_fn_negative(x, m)
        if m_trunc:
            with np.errstate(divide="ignore"):
                lambdas_negative = np.minimum(lambdas_negative, trunc_scale / (1 - mu_t))
                lambdas_negative = np.maximum(lambdas_negative, -trunc_scale / mu_t)
        else:
            lambdas_negative = np.minimum(lambdas_negative, trunc_scale)
            lambdas_negative = np.maximum(lambdas_negative, -trunc_scale)
        with np.errstate(invalid="ignore"):
            multiplicand_negative = 1 - lambdas_negative * (x - mu_t)
        multiplicand_negative[np.logical_and(lambdas_negative == math.inf, x - mu_t == 0)] = 1
        with np.errstate(invalid="ignore"):
            capital_process_negative = np.cumprod(multiplicand_negative)
        capital_process_negative[np.isnan(capital_process_negative)] = 0
    else:
        capital_process_negative = np.repeat(0, len(x))
    if theta == 1:
        capital_process = capital_process_positive
    elif theta == 0:
        capital_process = capital_process_negative
    else:
        if convex_comb:
            capital_process = theta * capital_process_positive + (1 - theta) * capital_process_negative
        else:
            capital_process = np.maximum(theta * capital_process_positive, (1 - theta) * capital_process_negative)
    capital_process[np.logical_or(mu_t < 0, mu_t > 1)] = math.inf
    assert not any(np.isnan(capital_process))
    assert all(capital_process >= 0)
    return capital_process


def logical_cs(x, N):
    t = np.arange(1, len(x) + 1)
    S_t = np.cumsum(x)
    return S_t / N, 1 - (t - S_t) / N


def cs_from_martingale(x, mart_fn, breaks=1000, alpha=0.05, N=None):
    possible_m = np.arange(0, 1 + 1 / breaks, step=1 / breaks)
    confseq_mtx = np.zeros((len(possible_m), len(x)))
    for i in np.arange(0, len(possible_m)):
        confseq_mtx[i, :] = mart_fn(x, possible_m[i]) <= 1 / alpha
    l, u = np.zeros(len(x)), np.ones(len(x))
    for j in np.arange(0, len(x)):
        where_in_cs = np.where(confseq_mtx[:, j])
        if len(where_in_cs[0]) == 0:
            l[j], u[j] = 0, 1
        else:
            l[j], u[j] = possible_m[where_in_cs[0][0]], possible_m[where_in_cs[0][-1]]
    l, u = np.maximum(0, l - 1 / breaks), np.minimum(1, u + 1 / breaks)
    if N is not None:
        logical_l, logical_u = logical_cs(x, N)
        l, u = np.maximum(l, logical_l), np.minimum(u, logical_u)
    return l, u


def hedged_cs(x, alpha=0.05, N=None, breaks=1000, theta=1 / 2, trunc_scale=1 / 2, prior_mean=1 / 2,
              prior_variance=1 / 4, fake_obs=1):
    """confseq's hedged_cs with running_intersection=False (one lambda function each side, so its
    diversified martingale is the single betting martingale)."""
    positive = lambda x, m: lambda_predmix_eb(x, alpha=alpha * theta, prior_mean=prior_mean,  # noqa: E731
                                              prior_variance=prior_variance, fake_obs=fake_obs)
    negative = lambda x, m: lambda_predmix_eb(x, alpha=alpha * (1 - theta), prior_mean=prior_mean,  # noqa: E731
                                              prior_variance=prior_variance, fake_obs=fake_obs)
    mart = lambda x, m: betting_mart(x, m, alpha=alpha, lambdas_fn_positive=positive,  # noqa: E731
                                     lambdas_fn_negative=negative, N=N, theta=theta, trunc_scale=trunc_scale)
    return cs_from_martingale(x, mart, breaks=breaks, alpha=alpha, N=N)
