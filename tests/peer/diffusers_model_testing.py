"""diffusers' model-test mixins, ported (the installed wheel has no tests): from diffusers'
`tests/models/testing_utils/` (`common.py`: `BaseModelTesterConfig`, `ModelTesterMixin`; `training.py`:
`TrainingTesterMixin`; `compile.py`: `TorchCompileTesterMixin`) and the helpers they use from
`tests/testing_utils.py`, at huggingface/diffusers 58eb52c080. The test bodies and tolerances are diffusers'; the
adaptations are listed in `test_models_transformer_mmdit.py`'s docstring and marked `adaptation:` here.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from collections import defaultdict
from typing import Any

import pytest
import torch
import torch.nn as nn
from accelerate.utils.modeling import _get_proper_dtype, dtype_byte_size
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, _add_variant, logging

# adaptation: DIFFUSERS_TEST_DEVICE picks the device as in diffusers; the default here is the CPU (CI has no GPU)
torch_device = os.environ.get("DIFFUSERS_TEST_DEVICE", "cpu")
# adaptation: torch.compile tests use this backend; diffusers' default (inductor) on GPUs, "aot_eager" on CPUs
# (dynamo's graph-break and recompilation checks, which these tests assert, are the same; inductor's C++ code
# generation takes minutes on a small CPU)
COMPILE_BACKEND = os.environ.get("PEER_COMPILE_BACKEND", "inductor" if torch_device != "cpu" else "aot_eager")


# ---------------------------------------------------------------------------------------------------------------
# tests/testing_utils.py
# ---------------------------------------------------------------------------------------------------------------
def torch_all_close(a, b, *args, **kwargs):
    if not torch.allclose(a, b, *args, **kwargs):
        assert False, f"Max diff is absolute {(a - b).abs().max()}. Diff tensor is {(a - b).abs()}."
    return True


def assert_tensors_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5, msg: str = "") -> None:
    if isinstance(actual, (list, tuple)) or isinstance(expected, (list, tuple)):
        if not (isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple))):
            raise AssertionError(f"{msg} Type mismatch: actual {type(actual)} vs expected {type(expected)}")
        if len(actual) != len(expected):
            raise AssertionError(f"{msg} Length mismatch: actual {len(actual)} vs expected {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tensors_close(a, e, atol=atol, rtol=rtol, msg=f"{msg} [element {i}]")
        return
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg} Shape mismatch: actual {actual.shape} vs expected {expected.shape}")
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        abs_diff = (actual - expected).abs()
        max_diff = abs_diff.max().item()
        flat_idx = abs_diff.argmax().item()
        max_idx = tuple(idx.item() for idx in torch.unravel_index(torch.tensor(flat_idx), actual.shape))
        threshold = atol + rtol * expected.abs()
        mismatched = (abs_diff > threshold).sum().item()
        total = actual.numel()
        raise AssertionError(
            f"{msg}\n"
            f"Tensors not close! Mismatched elements: {mismatched}/{total} ({100 * mismatched / total:.1f}%)\n"
            f"  Max diff: {max_diff:.6e} at index {max_idx}\n"
            f"  Actual:   {actual.flatten()[flat_idx].item():.6e}\n"
            f"  Expected: {expected.flatten()[flat_idx].item():.6e}\n"
            f"  atol: {atol:.6e}, rtol: {rtol:.6e}"
        )


def backend_empty_cache(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def full_determinism():
    """diffusers' `enable_full_determinism()`. adaptation: a module fixture that restores the previous settings,
    since pytest runs our other test files in the same process (diffusers calls it at import, for the process)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    env = {k: os.environ.get(k) for k in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG")}
    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(before[0])
    cudnn = torch.backends.cudnn
    cudnn.deterministic, cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before[1:]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------------------------------------------
# tests/models/testing_utils/common.py
# ---------------------------------------------------------------------------------------------------------------
def named_persistent_module_tensors(module: nn.Module, recurse: bool = False):
    yield from module.named_parameters(recurse=recurse)
    for named_buffer in module.named_buffers(recurse=recurse):
        name, _ = named_buffer
        parent = module
        if "." in name:
            parent_name = name.rsplit(".", 1)[0]
            for part in parent_name.split("."):
                parent = getattr(parent, part)
            name = name.split(".")[-1]
        if name not in parent._non_persistent_buffers_set:
            yield named_buffer


def compute_module_persistent_sizes(model: nn.Module, dtype=None, special_dtypes=None):
    if dtype is not None:
        dtype = _get_proper_dtype(dtype)
        dtype_size = dtype_byte_size(dtype)
    if special_dtypes is not None:
        special_dtypes = {key: _get_proper_dtype(dtyp) for key, dtyp in special_dtypes.items()}
        special_dtypes_size = {key: dtype_byte_size(dtyp) for key, dtyp in special_dtypes.items()}
    module_sizes = defaultdict(int)
    for name, tensor in named_persistent_module_tensors(model, recurse=True):
        if special_dtypes is not None and name in special_dtypes:
            size = tensor.numel() * special_dtypes_size[name]
        elif dtype is None:
            size = tensor.numel() * dtype_byte_size(tensor.dtype)
        elif str(tensor.dtype).startswith(("torch.uint", "torch.int", "torch.bool")):
            size = tensor.numel() * dtype_byte_size(tensor.dtype)
        else:
            size = tensor.numel() * min(dtype_size, dtype_byte_size(tensor.dtype))
        name_parts = name.split(".")
        for idx in range(len(name_parts) + 1):
            module_sizes[".".join(name_parts[:idx])] += size
    return module_sizes


def calculate_expected_num_shards(index_map_path):
    with open(index_map_path) as f:
        weight_map_dict = json.load(f)["weight_map"]
    first_key = list(weight_map_dict.keys())[0]
    weight_loc = weight_map_dict[first_key]
    return int(weight_loc.split("-")[-1].split(".")[0])


def cast_inputs_to_dtype(inputs, current_dtype, target_dtype):
    if torch.is_tensor(inputs):
        return inputs.to(target_dtype) if inputs.dtype == current_dtype else inputs
    if isinstance(inputs, dict):
        return {k: cast_inputs_to_dtype(v, current_dtype, target_dtype) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(cast_inputs_to_dtype(v, current_dtype, target_dtype) for v in inputs)
    return inputs


class BaseModelTesterConfig:
    @property
    def model_class(self) -> type[nn.Module]:
        raise NotImplementedError("Subclasses must implement the `model_class` property.")

    @property
    def pretrained_model_name_or_path(self) -> str | None:
        return None

    @property
    def pretrained_model_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def output_shape(self) -> tuple | None:
        return None

    @property
    def model_split_percents(self) -> list:
        return [0.9]

    def get_init_dict(self) -> dict[str, Any]:
        raise NotImplementedError("Subclasses must implement `get_init_dict()`.")

    def get_dummy_inputs(self) -> dict[str, Any]:
        raise NotImplementedError("Subclasses must implement `get_dummy_inputs()`.")


class BaseModelOutputMixin:
    @pytest.fixture(scope="class")
    def base_model_output(self):
        torch.manual_seed(0)
        model = self.model_class(**self.get_init_dict()).eval().to(torch_device)
        with torch.no_grad():
            return model(**self.get_dummy_inputs(), return_dict=False)[0]


@pytest.mark.usefixtures("full_determinism")
class ModelTesterMixin(BaseModelOutputMixin):
    """diffusers' `ModelTesterMixin`, every test that runs without several accelerators. adaptation: the two
    sharded-checkpoint tests, accelerator-gated in diffusers, run on the CPU too;
    `test_from_save_pretrained_dtype_inference` is `AcceleratorInferenceTesterMixin`; left out: `test_model_parallelism` (two accelerators) and the
    `_keep_in_fp32_modules` tests (they skip for a model without such modules, as SD3)."""

    @torch.no_grad()
    def test_from_save_pretrained(self, base_model_output, tmp_path, atol=5e-5, rtol=5e-5):
        torch.manual_seed(0)
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        model.save_pretrained(tmp_path)
        new_model = self.model_class.from_pretrained(tmp_path)
        new_model.to(torch_device)

        for param_name in model.state_dict().keys():
            param_1 = model.state_dict()[param_name]
            param_2 = new_model.state_dict()[param_name]
            assert param_1.shape == param_2.shape, (
                f"Parameter shape mismatch for {param_name}. Original: {param_1.shape}, loaded: {param_2.shape}"
            )

        new_image = new_model(**self.get_dummy_inputs(), return_dict=False)[0]
        assert_tensors_close(
            base_model_output, new_image, atol=atol, rtol=rtol, msg="Models give different forward passes."
        )

    @torch.no_grad()
    def test_from_save_pretrained_variant(self, base_model_output, tmp_path, atol=5e-5, rtol=0):
        torch.manual_seed(0)
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        model.save_pretrained(tmp_path, variant="fp16")
        new_model = self.model_class.from_pretrained(tmp_path, variant="fp16")

        with pytest.raises(OSError) as exc_info:
            self.model_class.from_pretrained(tmp_path)

        assert "Error no file named diffusion_pytorch_model.bin found in directory" in str(exc_info.value)

        new_model.to(torch_device)
        new_image = new_model(**self.get_dummy_inputs(), return_dict=False)[0]
        assert_tensors_close(
            base_model_output, new_image, atol=atol, rtol=rtol, msg="Models give different forward passes."
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_from_save_pretrained_dtype(self, tmp_path, dtype):
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        model.to(dtype)
        model.save_pretrained(tmp_path)
        new_model = self.model_class.from_pretrained(tmp_path, low_cpu_mem_usage=True, torch_dtype=dtype)
        assert new_model.dtype == dtype
        if hasattr(self.model_class, "_keep_in_fp32_modules") and self.model_class._keep_in_fp32_modules is None:
            new_model = self.model_class.from_pretrained(tmp_path, low_cpu_mem_usage=False, torch_dtype=dtype)
            assert new_model.dtype == dtype

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_from_pretrained_dtype_alias(self, tmp_path, dtype):
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        model.to(dtype)
        model.save_pretrained(tmp_path)
        new_model = self.model_class.from_pretrained(tmp_path, low_cpu_mem_usage=True, dtype=dtype)
        assert new_model.dtype == dtype

    @torch.no_grad()
    def test_determinism(self, atol=1e-5, rtol=0):
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        first = model(**self.get_dummy_inputs(), return_dict=False)[0]
        second = model(**self.get_dummy_inputs(), return_dict=False)[0]

        first_flat = first.flatten()
        second_flat = second.flatten()
        mask = ~(torch.isnan(first_flat) | torch.isnan(second_flat))
        assert_tensors_close(
            first_flat[mask], second_flat[mask], atol=atol, rtol=rtol, msg="Model outputs are not deterministic"
        )

    @torch.no_grad()
    def test_output(self, base_model_output, expected_output_shape=None):
        output = base_model_output

        assert output is not None, "Model output is None"
        assert output[0].shape == expected_output_shape or self.output_shape, (
            f"Output shape does not match expected. Expected {expected_output_shape}, got {output.shape}"
        )

    @torch.no_grad()
    def test_outputs_equivalence(self, atol=1e-5, rtol=0):
        def set_nan_tensor_to_zero(t):
            t[t != t] = 0
            return t

        def recursive_check(tuple_object, dict_object):
            if isinstance(tuple_object, (list, tuple)):
                for tuple_iterable_value, dict_iterable_value in zip(tuple_object, dict_object.values()):
                    recursive_check(tuple_iterable_value, dict_iterable_value)
            elif isinstance(tuple_object, dict):
                for tuple_iterable_value, dict_iterable_value in zip(tuple_object.values(), dict_object.values()):
                    recursive_check(tuple_iterable_value, dict_iterable_value)
            elif tuple_object is None:
                return
            else:
                assert_tensors_close(
                    set_nan_tensor_to_zero(tuple_object),
                    set_nan_tensor_to_zero(dict_object),
                    atol=atol,
                    rtol=rtol,
                    msg="Tuple and dict output are not equal",
                )

        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        model.eval()

        outputs_dict = model(**self.get_dummy_inputs())
        outputs_tuple = model(**self.get_dummy_inputs(), return_dict=False)

        recursive_check(outputs_tuple, outputs_dict)

    def test_getattr_is_correct(self, caplog):
        init_dict = self.get_init_dict()
        model = self.model_class(**init_dict)

        model.dummy_attribute = 5
        model.register_to_config(test_attribute=5)

        logger_name = "diffusers.models.modeling_utils"
        with caplog.at_level(logging.WARNING, logger=logger_name):
            caplog.clear()
            assert hasattr(model, "dummy_attribute")
            assert getattr(model, "dummy_attribute") == 5
            assert model.dummy_attribute == 5

        assert caplog.text == ""

        with caplog.at_level(logging.WARNING, logger=logger_name):
            caplog.clear()
            assert hasattr(model, "save_pretrained")
            fn = model.save_pretrained
            fn_1 = getattr(model, "save_pretrained")

            assert fn == fn_1

        assert caplog.text == ""

        with pytest.warns(FutureWarning):
            assert model.test_attribute == 5

        with pytest.warns(FutureWarning):
            assert getattr(model, "test_attribute") == 5

        with pytest.raises(AttributeError) as error:
            model.does_not_exist

        assert str(error.value) == f"'{type(model).__name__}' object has no attribute 'does_not_exist'"

    @torch.no_grad()
    def test_sharded_checkpoints(self, base_model_output, tmp_path, atol=1e-5, rtol=0):
        torch.manual_seed(0)
        config = self.get_init_dict()
        model = self.model_class(**config).eval()
        model = model.to(torch_device)

        model_size = compute_module_persistent_sizes(model)[""]
        max_shard_size = int((model_size * 0.75) / (2**10))

        model.cpu().save_pretrained(tmp_path, max_shard_size=f"{max_shard_size}KB")
        assert os.path.exists(os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME)), "Index file should exist"

        expected_num_shards = calculate_expected_num_shards(os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME))
        actual_num_shards = len([file for file in os.listdir(tmp_path) if file.endswith(".safetensors")])
        assert actual_num_shards == expected_num_shards, (
            f"Expected {expected_num_shards} shards, got {actual_num_shards}"
        )

        new_model = self.model_class.from_pretrained(tmp_path).eval()
        new_model = new_model.to(torch_device)

        torch.manual_seed(0)
        new_output = new_model(**self.get_dummy_inputs(), return_dict=False)[0]
        assert_tensors_close(
            base_model_output, new_output, atol=atol, rtol=rtol, msg="Output should match after sharded save/load"
        )

    @torch.no_grad()
    def test_sharded_checkpoints_with_variant(self, base_model_output, tmp_path, atol=1e-5, rtol=0):
        torch.manual_seed(0)
        config = self.get_init_dict()
        model = self.model_class(**config).eval()
        model = model.to(torch_device)

        model_size = compute_module_persistent_sizes(model)[""]
        max_shard_size = int((model_size * 0.75) / (2**10))
        variant = "fp16"

        model.cpu().save_pretrained(tmp_path, max_shard_size=f"{max_shard_size}KB", variant=variant)

        index_filename = _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
        assert os.path.exists(os.path.join(tmp_path, index_filename)), (
            f"Variant index file {index_filename} should exist"
        )

        expected_num_shards = calculate_expected_num_shards(os.path.join(tmp_path, index_filename))
        actual_num_shards = len([file for file in os.listdir(tmp_path) if file.endswith(".safetensors")])
        assert actual_num_shards == expected_num_shards, (
            f"Expected {expected_num_shards} shards, got {actual_num_shards}"
        )

        new_model = self.model_class.from_pretrained(tmp_path, variant=variant).eval()
        new_model = new_model.to(torch_device)

        torch.manual_seed(0)
        new_output = new_model(**self.get_dummy_inputs(), return_dict=False)[0]
        assert_tensors_close(
            base_model_output, new_output, atol=atol, rtol=rtol,
            msg="Output should match after variant sharded save/load",
        )

    @torch.no_grad()
    def test_sharded_checkpoints_with_parallel_loading(self, base_model_output, tmp_path, atol=1e-5, rtol=0):
        from diffusers.utils import constants

        torch.manual_seed(0)
        config = self.get_init_dict()
        model = self.model_class(**config).eval()
        model = model.to(torch_device)

        model_size = compute_module_persistent_sizes(model)[""]
        max_shard_size = int((model_size * 0.75) / (2**10))

        original_parallel_loading = constants.HF_ENABLE_PARALLEL_LOADING
        original_parallel_workers = getattr(constants, "HF_PARALLEL_WORKERS", None)

        try:
            model.cpu().save_pretrained(tmp_path, max_shard_size=f"{max_shard_size}KB")
            assert os.path.exists(os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME)), "Index file should exist"

            expected_num_shards = calculate_expected_num_shards(os.path.join(tmp_path, SAFE_WEIGHTS_INDEX_NAME))
            actual_num_shards = len([file for file in os.listdir(tmp_path) if file.endswith(".safetensors")])
            assert actual_num_shards == expected_num_shards, (
                f"Expected {expected_num_shards} shards, got {actual_num_shards}"
            )

            constants.HF_ENABLE_PARALLEL_LOADING = False
            model_sequential = self.model_class.from_pretrained(tmp_path).eval()
            model_sequential = model_sequential.to(torch_device)

            constants.HF_ENABLE_PARALLEL_LOADING = True
            constants.DEFAULT_HF_PARALLEL_LOADING_WORKERS = 2

            torch.manual_seed(0)
            model_parallel = self.model_class.from_pretrained(tmp_path).eval()
            model_parallel = model_parallel.to(torch_device)

            torch.manual_seed(0)
            output_parallel = model_parallel(**self.get_dummy_inputs(), return_dict=False)[0]
            assert_tensors_close(
                base_model_output, output_parallel, atol=atol, rtol=rtol,
                msg="Output should match with parallel loading",
            )
        finally:
            constants.HF_ENABLE_PARALLEL_LOADING = original_parallel_loading
            if original_parallel_workers is not None:
                constants.HF_PARALLEL_WORKERS = original_parallel_workers


class AcceleratorInferenceTesterMixin:
    """`ModelTesterMixin.test_from_save_pretrained_dtype_inference`, which diffusers runs on CUDA / XPU only.
    adaptation: a mixin of its own, added to the test classes only on such a device (so the CPU run has no skip)."""

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @torch.no_grad()
    def test_from_save_pretrained_dtype_inference(self, tmp_path, dtype, atol=1e-4, rtol=0):
        model = self.model_class(**self.get_init_dict())
        model.to(torch_device)
        fp32_modules = model._keep_in_fp32_modules or []
        persistent_tensor_names = {name for name, _ in named_persistent_module_tensors(model, recurse=True)}

        def keep_in_fp32(name):
            return any(module_to_keep_in_fp32 in name.split(".") for module_to_keep_in_fp32 in fp32_modules)

        for name, param in model.named_parameters():
            param.data = param.data.to(torch.float32 if keep_in_fp32(name) else dtype)
        for name, buf in model.named_buffers():
            if not buf.is_floating_point() or name not in persistent_tensor_names:
                continue
            buf.data = buf.data.to(torch.float32 if keep_in_fp32(name) else dtype)

        model.save_pretrained(tmp_path)
        model_loaded = self.model_class.from_pretrained(tmp_path, torch_dtype=dtype).to(torch_device)

        for name, param in model_loaded.named_parameters():
            if fp32_modules and any(
                module_to_keep_in_fp32 in name.split(".") for module_to_keep_in_fp32 in fp32_modules
            ):
                assert param.data.dtype == torch.float32
            else:
                assert param.data.dtype == dtype

        output = model(**cast_inputs_to_dtype(self.get_dummy_inputs(), torch.float32, dtype), return_dict=False)[0]
        output_loaded = model_loaded(
            **cast_inputs_to_dtype(self.get_dummy_inputs(), torch.float32, dtype), return_dict=False
        )[0]
        assert_tensors_close(
            output, output_loaded, atol=atol, rtol=rtol, msg=f"Loaded model output differs for {dtype}"
        )


# ---------------------------------------------------------------------------------------------------------------
# tests/models/testing_utils/training.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("full_determinism")
class TrainingTesterMixin:
    """diffusers' `TrainingTesterMixin`. adaptation: diffusers runs it on accelerators with training support only;
    it runs on the CPU here; `test_mixed_precision_training` is `AcceleratorTrainingTesterMixin`."""

    def setup_method(self):
        gc.collect()
        backend_empty_cache(torch_device)

    def teardown_method(self):
        gc.collect()
        backend_empty_cache(torch_device)

    def test_training(self):
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()

        model = self.model_class(**init_dict)
        model.to(torch_device)
        model.train()
        output = model(**inputs_dict, return_dict=False)[0]

        noise = torch.randn((output.shape[0],) + self.output_shape).to(torch_device)
        loss = torch.nn.functional.mse_loss(output, noise)
        loss.backward()

    def test_training_with_ema(self):
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()

        model = self.model_class(**init_dict)
        model.to(torch_device)
        model.train()
        ema_model = EMAModel(model.parameters())

        output = model(**inputs_dict, return_dict=False)[0]

        noise = torch.randn((output.shape[0],) + self.output_shape).to(torch_device)
        loss = torch.nn.functional.mse_loss(output, noise)
        loss.backward()
        ema_model.step(model.parameters())

    def test_gradient_checkpointing(self):
        assert self.model_class._supports_gradient_checkpointing  # adaptation: diffusers skips when not supported
        init_dict = self.get_init_dict()

        model = self.model_class(**init_dict)
        assert not model.is_gradient_checkpointing, "Gradient checkpointing should be disabled at init"

        model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing, "Gradient checkpointing should be enabled"

        model.disable_gradient_checkpointing()
        assert not model.is_gradient_checkpointing, "Gradient checkpointing should be disabled"

    def test_gradient_checkpointing_is_applied(self, expected_set=None):
        assert self.model_class._supports_gradient_checkpointing and expected_set is not None  # adaptation: as above
        init_dict = self.get_init_dict()

        model_class_copy = copy.copy(self.model_class)
        model = model_class_copy(**init_dict)
        model.enable_gradient_checkpointing()

        modules_with_gc_enabled = {}
        for submodule in model.modules():
            if hasattr(submodule, "gradient_checkpointing"):
                assert submodule.gradient_checkpointing, f"{submodule.__class__.__name__} should have GC enabled"
                modules_with_gc_enabled[submodule.__class__.__name__] = True

        assert set(modules_with_gc_enabled.keys()) == expected_set, (
            f"Modules with GC enabled {set(modules_with_gc_enabled.keys())} do not match expected set {expected_set}"
        )
        assert all(modules_with_gc_enabled.values()), "All modules should have GC enabled"

    def test_gradient_checkpointing_equivalence(self, loss_tolerance=1e-5, param_grad_tol=5e-5, skip=None):
        assert self.model_class._supports_gradient_checkpointing  # adaptation: as above
        if skip is None:
            skip = set()

        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()
        inputs_dict_copy = copy.deepcopy(inputs_dict)

        torch.manual_seed(0)
        model = self.model_class(**init_dict)
        model.to(torch_device)

        assert not model.is_gradient_checkpointing and model.training

        out = model(**inputs_dict, return_dict=False)[0]
        model.zero_grad()

        labels = torch.randn_like(out)
        loss = (out - labels).mean()
        loss.backward()

        torch.manual_seed(0)
        model_2 = self.model_class(**init_dict)
        model_2.load_state_dict(model.state_dict())
        model_2.to(torch_device)
        model_2.enable_gradient_checkpointing()

        assert model_2.is_gradient_checkpointing and model_2.training

        out_2 = model_2(**inputs_dict_copy, return_dict=False)[0]
        model_2.zero_grad()
        loss_2 = (out_2 - labels).mean()
        loss_2.backward()

        assert (loss - loss_2).abs() < loss_tolerance, (
            f"Loss difference {(loss - loss_2).abs()} exceeds tolerance {loss_tolerance}"
        )

        named_params = dict(model.named_parameters())
        named_params_2 = dict(model_2.named_parameters())

        for name, param in named_params.items():
            if "post_quant_conv" in name:
                continue
            if name in skip:
                continue
            if param.grad is None:
                continue

            assert torch_all_close(param.grad.data, named_params_2[name].grad.data, atol=param_grad_tol), (
                f"Gradient mismatch for {name}"
            )

class AcceleratorTrainingTesterMixin:
    """`TrainingTesterMixin.test_mixed_precision_training`: its autocast passes run on accelerators only (the test's
    own device checks). adaptation: a mixin of its own, added only on an accelerator (on a CPU it would test
    nothing)."""

    def test_mixed_precision_training(self):
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()

        model = self.model_class(**init_dict)
        model.to(torch_device)
        model.train()

        if torch.device(torch_device).type != "cpu":
            with torch.amp.autocast(device_type=torch.device(torch_device).type, dtype=torch.float16):
                output = model(**inputs_dict, return_dict=False)[0]

                noise = torch.randn((output.shape[0],) + self.output_shape).to(torch_device)
                loss = torch.nn.functional.mse_loss(output, noise)

            loss.backward()

        if torch.device(torch_device).type != "cpu":
            model.zero_grad()
            with torch.amp.autocast(device_type=torch.device(torch_device).type, dtype=torch.bfloat16):
                output = model(**inputs_dict, return_dict=False)[0]

                noise = torch.randn((output.shape[0],) + self.output_shape).to(torch_device)
                loss = torch.nn.functional.mse_loss(output, noise)

            loss.backward()


# ---------------------------------------------------------------------------------------------------------------
# tests/models/testing_utils/compile.py
# ---------------------------------------------------------------------------------------------------------------
class TorchCompileTesterMixin:
    """diffusers' `TorchCompileTesterMixin`: the two tests that run on one device without group offloading.
    adaptation: the compile backend is `COMPILE_BACKEND` (inductor on GPUs, aot_eager on CPUs; diffusers runs these
    on accelerators only). Left out: `test_compile_on_different_shapes` (it skips unless a config lists shapes, as
    SD3's does not), `test_compile_with_group_offloading` (CUDA streams) and `test_compile_works_with_aot`
    (AOTInductor packaging; accelerator-only in diffusers, and minutes of C++ compilation on a CPU)."""

    def setup_method(self):
        torch.compiler.reset()
        gc.collect()
        backend_empty_cache(torch_device)

    def teardown_method(self):
        torch.compiler.reset()
        gc.collect()
        backend_empty_cache(torch_device)

    @torch.no_grad()
    def test_torch_compile_recompilation_and_graph_break(self):
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()

        model = self.model_class(**init_dict).to(torch_device)
        model.eval()
        model = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)

        with (
            torch._inductor.utils.fresh_inductor_cache(),
            torch._dynamo.config.patch(error_on_recompile=True),
        ):
            _ = model(**inputs_dict)
            _ = model(**inputs_dict)

    @torch.no_grad()
    def test_torch_compile_repeated_blocks(self, recompile_limit=1):
        assert self.model_class._repeated_blocks  # adaptation: diffusers skips a model without `_repeated_blocks`
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()

        model = self.model_class(**init_dict).to(torch_device)
        model.eval()
        model.compile_repeated_blocks(fullgraph=True, backend=COMPILE_BACKEND)

        with (
            torch._inductor.utils.fresh_inductor_cache(),
            torch._dynamo.config.patch(recompile_limit=recompile_limit),
        ):
            _ = model(**inputs_dict)
            _ = model(**inputs_dict)
