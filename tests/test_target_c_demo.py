"""Demo 1 of the c target: scikit-learn's digits, a small MLP trained here (seeded), compiled w8a8
to C, and all 1,797 predictions compared with ONNX Runtime on the same int8 graph: on the host
(gcc with sanitizers), on an emulated Cortex-M4 (hard float) and Cortex-M3 (soft float)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import lbcc
from lbcc.targets.c import toolchain
from lbcc.targets.c.check import bit_exact, mismatches, run_c, run_ort

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
N_TRAIN = 1200


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = (data.data / 16.0).astype(np.float32)  # [1797, 64] in [0, 1]
    return x, data.target.astype(np.int64)


def digits_mlp_onnx(x: np.ndarray, y: np.ndarray, hidden: int = 32):
    """An MLPClassifier (ReLU, seeded) trained on the first N_TRAIN images, as an ONNX graph
    x[1, 64] -> Gemm -> Relu -> Gemm -> logits[1, 10]."""
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", max_iter=400,
                        random_state=0)
    clf.fit(x[:N_TRAIN], y[:N_TRAIN])
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2")]
    graph = helper.make_graph(
        nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def compiled_mlp(digits, tmp_path_factory):
    x, y = digits
    tmp = tmp_path_factory.mktemp("digits")
    np.savez(tmp / "calib.npz", x=x[:N_TRAIN:4])  # 300 training images
    source = digits_mlp_onnx(x, y)
    result = lbcc.compile(source, target="c", preset="w8a8", calibration=tmp / "calib.npz",
                          progress=False)
    result.save(tmp / "c")
    ref = run_ort(result.model, [x[:, None]])[0]
    import onnxruntime as ort

    sess = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    float_logits = np.stack([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    print(f"digits MLP float32: accuracy {_accuracy(float_logits, y)}")
    return result, ref, tmp


def _accuracy(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    pred = logits.reshape(len(y), -1).argmax(axis=1)
    return float((pred == y).mean()), float((pred[N_TRAIN:] == y[N_TRAIN:]).mean())


def test_digits_mlp_host_all_images_bit_exact(digits, compiled_mlp):
    x, y = digits
    result, ref, tmp = compiled_mlp
    (got,), _ = run_c(result.model, [x[:, None]], tmp / "host")
    assert bit_exact(got, ref), f"{mismatches(got, ref)} logits differ from ORT"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    acc_all, acc_held_out = _accuracy(got, y)
    print(f"digits MLP w8a8 in C: accuracy {acc_all:.4f} on all 1797, {acc_held_out:.4f} on the "
          f"{len(y) - N_TRAIN} held out")
    assert acc_held_out > 0.9


@pytest.mark.slow
@pytest.mark.skipif(not toolchain.have_arm_tools(), reason="needs arm-none-eabi-gcc and "
                    f"qemu-system-arm (apt-get install {toolchain.APT_PACKAGES})")
@pytest.mark.parametrize("core", ["cortex-m4", "cortex-m3"])
def test_digits_mlp_cortex_m_all_images_bit_exact(digits, compiled_mlp, core):
    x, y = digits
    result, ref, tmp = compiled_mlp
    (got,), run = run_c(result.model, [x[:, None]], tmp / core, core=core)
    assert run.stats["samples"] == len(y)
    assert bit_exact(got, ref), f"{mismatches(got, ref)} logits differ from ORT"
    acc_all, acc_held_out = _accuracy(got, y)
    print(f"digits MLP on {core}: accuracy {acc_all:.4f} (held out {acc_held_out:.4f}), "
          f"{run.instructions_per_inference:.0f} instructions/inference, sizes {run.sizes}, "
          f"stack {run.stats['stack_bytes']} B")
    assert run.sizes["model_flash"] < 64 * 1024
    assert run.stats["stack_bytes"] < 4096


# ----------------------------------------------------------------------------- the digits CNN

def digits_cnn_onnx(x: np.ndarray, y: np.ndarray, epochs: int = 60):
    """A small CNN trained here with torch (seeded, full batch, on the first N_TRAIN images):
    x[1, 1, 8, 8] -> Conv 3x3 (8) -> Relu -> MaxPool 2 -> depthwise Conv 3x3 -> Relu
    -> Conv 1x1 (16) -> Relu -> MaxPool 2 -> Reshape [1, 64] -> Gemm -> logits[1, 10]."""
    torch = pytest.importorskip("torch")
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and 5x faster than 2 contended threads here
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64, 10))
    xt = torch.from_numpy(x[:N_TRAIN].reshape(-1, 1, 8, 8))
    yt = torch.from_numpy(y[:N_TRAIN])
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    p = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    mp = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [helper.make_node("Conv", ["x", "0.weight", "0.bias"], ["c1"], name="conv1",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **mp),
             helper.make_node("Conv", ["p1", "3.weight", "3.bias"], ["c2"], name="dwconv",
                              pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "5.weight", "5.bias"], ["c3"], name="pwconv"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("MaxPool", ["r3"], ["p3"], name="pool2", **mp),
             helper.make_node("Reshape", ["p3", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "9.weight", "9.bias"], ["logits"], name="fc",
                              transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    inits.append(numpy_helper.from_array(np.array([1, 64], np.int64), "flat"))
    graph = helper.make_graph(
        nodes, "digits_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def compiled_cnn(digits, tmp_path_factory):
    x, y = digits
    tmp = tmp_path_factory.mktemp("digits_cnn")
    images = x.reshape(-1, 1, 1, 8, 8)
    np.savez(tmp / "calib.npz", x=images[:N_TRAIN:4, 0])
    source = digits_cnn_onnx(x, y)
    result = lbcc.compile(source, target="c", preset="w8a8", calibration=tmp / "calib.npz",
                          progress=False)
    result.save(tmp / "c")
    ref = run_ort(result.model, [images])[0]
    import onnxruntime as ort

    sess = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    float_logits = np.stack([sess.run(None, {"x": images[i]})[0] for i in range(len(x))])
    print(f"digits CNN float32: accuracy {_accuracy(float_logits, y)}")
    return result, ref, tmp, images


def test_digits_cnn_is_integer_and_bit_exact_on_host(digits, compiled_cnn):
    x, y = digits
    result, ref, tmp, images = compiled_cnn
    ops = result.report.data["passes"][-1]["notes"]["ops"]
    assert ops.get("qconv2d -> 8-bit (QLinearConv)") == 3, ops
    assert ops.get("maxpool") == 2
    (got,), _ = run_c(result.model, [images], tmp / "host")
    assert bit_exact(got, ref), f"{mismatches(got, ref)} logits differ from ORT"
    acc_all, acc_held_out = _accuracy(got, y)
    print(f"digits CNN w8a8 in C: accuracy {acc_all:.4f} on all 1797, {acc_held_out:.4f} held out")
    assert acc_held_out > 0.85


@pytest.mark.slow
@pytest.mark.skipif(not toolchain.have_arm_tools(), reason="needs arm-none-eabi-gcc and "
                    f"qemu-system-arm (apt-get install {toolchain.APT_PACKAGES})")
def test_digits_cnn_cortex_m4_all_images_bit_exact(digits, compiled_cnn):
    x, y = digits
    result, ref, tmp, images = compiled_cnn
    (got,), run = run_c(result.model, [images], tmp / "m4", core="cortex-m4")
    assert bit_exact(got, ref), f"{mismatches(got, ref)} logits differ from ORT"
    acc_all, acc_held_out = _accuracy(got, y)
    print(f"digits CNN on cortex-m4: accuracy {acc_all:.4f} (held out {acc_held_out:.4f}), "
          f"{run.instructions_per_inference:.0f} instructions/inference, sizes {run.sizes}, "
          f"stack {run.stats['stack_bytes']} B")
