"""The privacy audit: what an honest-but-curious server learns of a client's training positives
from its uploads. Attacks: :mod:`gfmfr.privacy.audit`.

A federation (default FCF, ML-100K, seed 0) trains ``--rounds`` rounds; in the next round every
client (or ``--clients`` of them) trains once more and uploads its item rows and its head signature
(GFMFR's grouping input). For each upload variant the server runs each attack on each client and
the script prints the mean AUC (the client's positives against every other item) and precision@10:

- ``sparse rows``: the rows it trained (the default upload);
- ``dense``: the whole table (no item ids are sent, but untrained rows differ only by decay);
- ``central DP``: clipped to ``privacy.clip``; the server itself adds the noise later, so it sees this;
- ``local DP eps=E``: clipped and noised on the client, sigma calibrated so that ``--dp-rounds``
  rounds spend epsilon E (:mod:`gfmfr.privacy.accounting`);
- ``SecAgg+ sum``: under ``privacy.secure_aggregation`` the server sees only the sum over a round's
  clients (half the audited clients here); every attack on it ranks the items alike for every client,
  so it is scored on the positives of the clients in the sum and, as the control, of those not in it:
  what the sum tells of a client is the gap between the two;
- ``signature``: GFMFR's head signature scoring every item with the broadcast table, sent as it is
  and with ``privacy.signature_noise`` at each ``--signature-noise`` (signature_clip as configured).

    python benchmarks/privacy_audit.py [--model fcf] [--rounds 30] [--clients 943] [--dp-rounds 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np

from gfmfr.build import build_run_model
from gfmfr.config import PrivacyConfig, apply_overrides, from_dict
from gfmfr.data import load_dataset
from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation
from gfmfr.federation.messages import LocalUpdate
from gfmfr.privacy import audit
from gfmfr.privacy.accounting import PrivacyLedger, RoundReleases
from gfmfr.privacy.dp import clip_updates, privatise

log = logging.getLogger("privacy_audit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fcf")
    ap.add_argument("--rounds", type=int, default=30, help="rounds trained before the audited round")
    ap.add_argument("--clients", type=int, default=0, help="audit this many clients (0: all)")
    ap.add_argument("--dp-rounds", type=int, default=100, help="rounds the local-DP epsilons are spent over")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8, 4, 1])
    ap.add_argument("--signature-noise", type=float, nargs="+", default=[0.5, 1, 2, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override section.key=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = from_dict(
        apply_overrides(
            {"seed": args.seed, "model": {"name": args.model}, "federation": {"rounds": args.rounds + 1}}, args.set
        )
    )
    dataset = load_dataset(cfg.data)
    model, plugins = build_run_model(dataset, cfg)
    fed = Federation(dataset, model, cfg, plugins)
    t0 = time.perf_counter()
    for t in range(args.rounds):
        fed.train_round(t)
    log.info("trained %d rounds in %.0f s", args.rounds, time.perf_counter() - t0)

    rng = np.random.default_rng(args.seed)
    users = (
        np.arange(dataset.n_users)
        if not args.clients
        else np.sort(rng.choice(dataset.n_users, args.clients, replace=False))
    )
    shared = {n: v.clone() for n, v in fed.state.shared.items()}
    update = train_clients(
        model, fed.state, users, dataset, cfg.federation, cfg.seed, args.rounds, want_signatures=True
    )
    table = model.item_table
    g = shared[table]
    signature_norms = np.linalg.norm(update.signatures.numpy(), axis=1)
    log.info("audited %d clients; signature norm median %.3f", len(update.users), np.median(signature_norms))

    variants = {"sparse rows": update, "dense": update, "central DP": clip_updates(update, shared, cfg.privacy.clip)}
    for eps in args.epsilons:
        p = PrivacyConfig(mode="local", clip=cfg.privacy.clip, target_epsilon=eps)
        sigma = PrivacyLedger(p, dataset.n_users, 1.0, args.dp_rounds, lambda t: RoundReleases()).sigma
        variants[f"local DP eps={eps:g} (sigma {sigma:.3g})"] = privatise(
            update, shared, p, sigma, cfg.seed, args.rounds
        )
    signatures = {"signature": update.signatures}
    for s in args.signature_noise:
        p = dataclasses.replace(cfg.privacy, signature_noise=s)
        signatures[f"signature, noise {s:g} (clip {p.signature_clip:g})"] = privatise(
            dataclasses.replace(update, signatures=update.signatures.clone()), shared, p, None, cfg.seed, args.rounds
        ).signatures

    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i, user in enumerate(update.users):
        positives = dataset.user_train(int(user))
        for name, up in variants.items():
            mine = up.upload(i)
            dense = audit.dense_table(mine.rows[table], mine.row_item, mine.decay[table], g)
            delta = audit.change(dense, g)
            attacks = {"change size": audit.score_size(delta)}
            if name == "sparse rows":
                sent = np.zeros(dataset.n_items, bool)
                sent[mine.row_item] = True
                attacks["rows"] = audit.score_rows(mine.row_item, dataset.n_items)
                attacks["change direction"] = audit.score_direction(delta, sent)
            else:
                attacks["change direction"] = audit.score_direction(delta)
            for attack, scores in attacks.items():
                figures.setdefault((name, attack), []).append(audit.attack_figures(scores, positives, seed=i))
        for name, sig in signatures.items():
            figures.setdefault((name, "signature"), []).append(
                audit.attack_figures(audit.score_signature(model, sig[i], g), positives, seed=i)
            )

    # SecAgg+: the server sees one sum per round, over every node's clients. The round's participants
    # are half the audited clients; an attack on the sum ranks items alike for everyone, so it is scored
    # on the participants' positives and, as the control, on the positives of clients not in the sum.
    inside = np.zeros(len(update.users), bool)
    inside[rng.permutation(len(update.users))[: len(update.users) // 2]] = True
    summed = FedAvg()
    summed.add(LocalUpdate.concat([update], np.flatnonzero(inside)), shared)
    delta = audit.change(summed.sums[table] / summed.total, g)
    secagg = {"change size": audit.score_size(delta), "change direction": audit.score_direction(delta)}
    for i, user in enumerate(update.users):
        who = "in the sum" if inside[i] else "not in it (control)"
        for attack, scores in secagg.items():
            figures.setdefault((f"SecAgg+ sum, clients {who}", attack), []).append(
                audit.attack_figures(scores, dataset.user_train(int(user)), seed=i)
            )

    print(
        f"\nprivacy audit: {args.model} on {cfg.data.dataset}, round {args.rounds}, {len(update.users)} clients, "
        f"clip {cfg.privacy.clip:g}"
    )
    print(f"{'upload':<44} {'attack':<17} {'AUC':>6} {'P@10':>6}")
    for (name, attack), values in figures.items():
        auc, prec = np.mean(values, axis=0)
        print(f"{name:<44} {attack:<17} {auc:6.3f} {prec:6.3f}")


if __name__ == "__main__":
    main()
