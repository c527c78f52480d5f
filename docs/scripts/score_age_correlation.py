"""How much a NAMM's score follows a token's age, on `namm distill` recordings.

For each recorded step of layers 4, 14 and 24, the correlation between each
head's score ranks and its tokens' ages (a Spearman correlation: the ages are
already ranks), averaged over heads. Positive: the NAMM keeps old tokens.

    python docs/scripts/score_age_correlation.py NAMM_DIR RECORDING.npz [...]
"""

import sys

import numpy as np

from namm_mlx.bam import bam_scores
from namm_mlx.distill.fit import recorded_embedding
from namm_mlx.distill.record import ItemRecord
from namm_mlx.features import RecencyTable
from namm_mlx.namm import NAMM


def main() -> None:
    namm = NAMM.load(sys.argv[1])
    recency = RecencyTable(namm.config)
    for path in sys.argv[2:]:
        record = ItemRecord.load(path)
        print(record.item_id, record.doc_length)
        for s in record.steps:
            if s.layer not in (4, 14, 24):
                continue
            scores = np.array(bam_scores(recorded_embedding([s], namm, recency)[0], namm.weights, namm.config).scores)
            corr = [np.corrcoef(np.argsort(np.argsort(scores[h])), s.ages[h])[0, 1] for h in range(scores.shape[0])]
            print(f"  layer {s.layer:2d} step {s.offset:5d}: corr(score rank, age) {np.mean(corr):+.2f}")


if __name__ == "__main__":
    main()
