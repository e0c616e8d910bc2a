#!/usr/bin/env python3
"""Builds `fraud_mlp.onnx`, a small playback-fraud scorer, and `reference.json` to test it.

The model is a 2-layer MLP trained here, with a fixed seed, on synthetic sessions whose fraud
label follows a known logistic rule. It reads one row of 6 float32 features per session:

    0  watch_seconds_z       watch time, standardised (z-score); bots watch little
    1  bitrate_z             mean bitrate, standardised; extreme values are suspicious
    2  sessions_last_hour    sessions the account started in the last hour (count)
    3  distinct_devices_24h  distinct devices on the account in the last 24 hours (count, >= 1)
    4  country_mismatch      1.0 when the playback country differs from the billing country
    5  account_age_days_log  ln(1 + account age in days)

Graph (opset 13, IR version 8, readable by tract):

    features f32[N, 6] -> MatMul + Add -> Relu (16) -> MatMul + Add -> Sigmoid -> score f32[N, 1]

`score` is the probability that the session is fraudulent. `reference.json` holds 64 input
rows drawn with the seed and numpy's float32 forward pass on them, so the Rust `model` stage
can be checked against an independent computation.

Run from this directory: `python3 make_model.py`. The output is the same on every run.
"""

import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20260117
FEATURES = [
    "watch_seconds_z",
    "bitrate_z",
    "sessions_last_hour",
    "distinct_devices_24h",
    "country_mismatch",
    "account_age_days_log",
]
HIDDEN = 16
HERE = Path(__file__).resolve().parent


def draw_sessions(rng, n):
    """n rows of plausible feature values, as float32."""
    x = np.empty((n, len(FEATURES)), dtype=np.float64)
    x[:, 0] = rng.normal(0.0, 1.0, n)
    x[:, 1] = rng.normal(0.0, 1.0, n)
    x[:, 2] = rng.poisson(1.5, n)
    x[:, 3] = 1 + rng.poisson(0.7, n)
    x[:, 4] = rng.random(n) < 0.15
    x[:, 5] = np.log1p(rng.uniform(0.0, 2000.0, n))
    return x.astype(np.float32)


def true_logit(x):
    """The rule the synthetic labels follow (a little non-linear, so the MLP has work)."""
    x = x.astype(np.float64)
    return (
        -2.0
        - 0.6 * x[:, 0]
        + 0.5 * np.abs(x[:, 1])
        + 0.6 * x[:, 2]
        + 0.9 * (x[:, 3] - 1)
        + 1.8 * x[:, 4]
        - 0.5 * (x[:, 5] - 4.0)
        + 1.0 * x[:, 4] * (x[:, 3] > 2)
    )


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def train(rng, x, y, steps=1500, lr=0.02):
    """Full-batch Adam on binary cross-entropy; returns float32 weights."""
    n, f = x.shape
    x = x.astype(np.float64)
    params = {
        "w1": rng.normal(0.0, np.sqrt(2.0 / f), (f, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0.0, np.sqrt(1.0 / HIDDEN), (HIDDEN, 1)),
        "b2": np.zeros(1),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t in range(1, steps + 1):
        pre = x @ params["w1"] + params["b1"]
        h = np.maximum(pre, 0.0)
        p = sigmoid(h @ params["w2"] + params["b2"])[:, 0]
        d_logit = ((p - y) / n)[:, None]
        d_h = (d_logit @ params["w2"].T) * (pre > 0)
        grads = {
            "w2": h.T @ d_logit,
            "b2": d_logit.sum(0),
            "w1": x.T @ d_h,
            "b1": d_h.sum(0),
        }
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            m_hat = m[k] / (1 - 0.9**t)
            v_hat = v[k] / (1 - 0.999**t)
            params[k] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return {k: p.astype(np.float32) for k, p in params.items()}


def forward(w, x):
    """The exported graph's computation, in float32."""
    h = np.maximum(x @ w["w1"] + w["b1"], np.float32(0))
    z = h @ w["w2"] + w["b2"]
    return (np.float32(1) / (np.float32(1) + np.exp(-z))).astype(np.float32)


def build_onnx(w):
    init = [
        numpy_helper.from_array(w["w1"], "w1"),
        numpy_helper.from_array(w["b1"], "b1"),
        numpy_helper.from_array(w["w2"], "w2"),
        numpy_helper.from_array(w["b2"], "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h_mm"], name="dense1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"], name="dense1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["z_mm"], name="dense2"),
        helper.make_node("Add", ["z_mm", "b2"], ["z"], name="dense2_bias"),
        helper.make_node("Sigmoid", ["z"], ["score"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "fraud_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(FEATURES)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        initializer=init,
    )
    model = helper.make_model(
        graph,
        producer_name="sluice make_model.py",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    model.doc_string = "Playback fraud scorer; features: " + ", ".join(FEATURES)
    onnx.checker.check_model(model)
    return model


def main():
    rng = np.random.default_rng(SEED)
    x_train = draw_sessions(rng, 8192)
    y_train = (rng.random(len(x_train)) < sigmoid(true_logit(x_train))).astype(np.float64)
    weights = train(rng, x_train, y_train)

    onnx.save(build_onnx(weights), HERE / "fraud_mlp.onnx")

    x_ref = draw_sessions(rng, 64)
    y_ref = forward(weights, x_ref)
    reference = {
        "about": "64 rows drawn by make_model.py and numpy's float32 forward pass on them",
        "inputs": FEATURES,
        "outputs": ["score"],
        "rows": [[float(v) for v in row] for row in x_ref],
        "scores": [[float(v) for v in row] for row in y_ref],
    }
    # One row per line: readable, and diffs stay small.
    text = json.dumps(reference, indent=1)
    flat = lambda m: "[" + " ".join(m.group(1).split()) + "]"  # noqa: E731
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", flat, text)
    (HERE / "reference.json").write_text(text + "\n")

    scores = y_ref[:, 0]
    train_p = forward(weights, x_train)[:, 0]
    accuracy = float(np.mean((train_p > 0.5) == (y_train > 0.5)))
    print(
        f"wrote fraud_mlp.onnx and reference.json; reference scores "
        f"min {scores.min():.3f} median {np.median(scores):.3f} max {scores.max():.3f}; "
        f"training accuracy {accuracy:.3f}, base rate {y_train.mean():.3f}"
    )


if __name__ == "__main__":
    main()
