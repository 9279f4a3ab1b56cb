"""The speed benchmark (tests/bench_speed.py) at a tiny size on the CPU: it runs every part it has, and what it
counts agrees with the arithmetic of the speed issue."""
import json

import bench_speed


def test_benchmark_runs_and_counts_the_expected_flops(capsys):
    batch = 4
    result = bench_speed.main(["--device", "cpu", "--batch-size", str(batch), "--steps", "1",
                               "--augment-images", "16", "--mhe-repeats", "1", "--expander", "64-64-32"])
    assert json.loads(capsys.readouterr().out) == result                      # stdout is exactly the JSON
    aug = result["augmentation"]
    assert aug["batched_views_per_s"] > 0 and aug["per_image_views_per_s"] > 0
    assert aug["ratio"] == round(aug["batched_views_per_s"] / aug["per_image_views_per_s"], 2)

    train = result["training"]
    assert set(train) == {"byol", "byol_uniformity", "byol_mhe", "simclr", "msbreg", "sfrik"}
    for r in train.values():
        assert r["step_s"] > 0 and abs(r["epoch_50k_s"] - 50000 * r["step_s"] / batch) < 1e-3 * r["epoch_50k_s"]
        assert r["tflops"] > 0 and r["images_per_s"] > 0
    # BYOL with ResNet-18 at 32x32: 2 views x (online forward + backward, 3 x 1.11 GFLOP, + target forward,
    # 1.11 GFLOP) = 8.9 GFLOP per image, the "about 9 GFLOP"
    byol_per_image = train["byol"]["tflop_per_step"] * 1e12 / batch
    assert 8.5e9 < byol_per_image < 9.3e9
    # SimCLR has no target network and no predictor: about 6.7 GFLOP per image, below BYOL
    assert train["simclr"]["tflop_per_step"] < 0.8 * train["byol"]["tflop_per_step"]
    # SFRIK, like SimCLR, is two encoder passes with backward; with this small expander the heads' and the MMD's
    # FLOPs are below 0.1 % of the encoder's
    assert abs(train["sfrik"]["tflop_per_step"] / train["simclr"]["tflop_per_step"] - 1) < 0.01
    # Eq. 7 on projector and predictor adds a batch-independent cost: forward and backward (3x) of the Gram
    # products of the two 4096-neuron layers, 2 * 4096^2 * (512 + 256) FLOPs forward
    gram = 3 * 2 * 4096 ** 2 * (512 + 256)
    extra = (train["byol_mhe"]["tflop_per_step"] - train["byol"]["tflop_per_step"]) * 1e12
    assert 0.95 * gram < extra < 1.1 * gram
    # MSBReg with M = 4 views runs BYOL's networks on twice as many views; its SVD (not counted by the FLOP
    # counter) and the other terms are a few (B, 256) products
    assert 1.95 < train["msbreg"]["tflop_per_step"] / train["byol"]["tflop_per_step"] < 2.05
    mhe = result["mhe"]
    assert mhe["regulariser_s"] > 0
    assert mhe["byol_mhe_over_byol"] == round(train["byol_mhe"]["step_s"] / train["byol"]["step_s"], 4)
