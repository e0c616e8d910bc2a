"""Writes the personalization example's data, deterministically (Python standard library only):

- `model.json`: the recommender `score` loads — 16 feature weights and 500 titles, each with
  a 16-feature vector and a popularity (the fallback list is the most popular titles);
- `../../data/profiles.jsonl`: a profile for 1,800 of the 2,000 users the example's generator
  makes (user ids 1..=2000; every tenth user has none, and gets the fallback list): plan,
  country and the user's 16-feature taste vector.

Users and titles share latent "genres": a user's vector leans toward a few genres, a title's
toward one, so the top-k lists are not random.

    python3 pipelines/models/recs/make_data.py
"""

import json
import os
import random

FEATURES = 16
TITLES = 500
USERS = 2000
HERE = os.path.dirname(os.path.abspath(__file__))


def unit(rng, lean):
    v = [rng.gauss(0.0, 0.3) for _ in range(FEATURES)]
    for g in lean:
        v[g] += 1.0
    norm = sum(x * x for x in v) ** 0.5
    return [round(x / norm, 4) for x in v]


def main():
    rng = random.Random(2026)
    weights = [round(0.5 + rng.random(), 4) for _ in range(FEATURES)]
    content = []
    for j in range(TITLES):
        genre = rng.randrange(FEATURES)
        content.append({
            "id": 10_000 + j,
            "vector": unit(rng, [genre]),
            "popularity": round(rng.paretovariate(1.5), 4),
        })
    with open(os.path.join(HERE, "model.json"), "w") as f:
        json.dump({"weights": weights, "content": content}, f, separators=(",", ":"))

    plans = ["basic", "standard", "premium"]
    countries = ["US", "BR", "IN", "DE", "JP", "MX", "GB", "FR"]
    path = os.path.join(HERE, "..", "..", "data", "profiles.jsonl")
    with open(path, "w") as f:
        for user in range(1, USERS + 1):
            if user % 10 == 0:
                continue
            lean = rng.sample(range(FEATURES), 2)
            profile = {
                "user_id": user,
                "plan": plans[user % 3],
                "home_country": countries[user % len(countries)],
                "taste": unit(rng, lean),
            }
            f.write(json.dumps(profile, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
