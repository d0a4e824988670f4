"""scripts/profile_step.py sorts kernels into categories by name; real kernel names from H100 profiles."""

from __future__ import annotations

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def categorise():
    return load_script("profile_step").categorise


@pytest.mark.parametrize("name,category", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_badd_coopA_NTT", "gemm"),
    ("nvjet_sm90_qrtst_128x160_128x5_1x2_h_bz_coopA_algo2_TNT", "gemm"),          # float8 GEMM
    ("triton_poi_fused__scaled_mm__to_copy_clamp_mul_reciprocal_silu_t_view_18",   # cast feeding it
     "float8 amax / scale / cast (triton)"),
    ("triton_red_fused_abs_max_mul_silu_silu_backward_view_6", "float8 amax / scale / cast (triton)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1", "attention"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "topk/sort"),
    ("triton_red_fused__to_copy_add_div_expand_gather_mean_mul_pow_rsqrt_scatter_select_sigmoid",
     "fused reductions (triton)"),
    ("triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_105", "fused elementwise (triton)"),
    ("void at::native::_scatter_gather_elementwise_kernel<128, 8>", "gather/scatter"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>",
     "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy/cast"),
    ("void at::native::detail::chunk_cat_cuda_kernel<float, c10::BFloat16>", "other"),
])
def test_kernel_names_fall_in_the_right_category(categorise, name, category):
    assert categorise(name) == category


def _event(name, device_us, *, cuda=True, annotation=False, cpu_us=0.0):
    import torch
    from types import SimpleNamespace
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind, is_user_annotation=annotation,
                           device_time_total=device_us, self_cpu_time_total=cpu_us)


def test_kernel_tables_sum_device_time_and_count_per_category_and_name():
    script = load_script("profile_step")
    events = [_event("nvjet_sm90_tst_256x128", 10.0), _event("nvjet_sm90_tst_256x128", 12.0),
              _event("triton_poi_fused_mul_3", 2.5),
              _event("Optimizer.step#AdamW.step", 99.0),                  # annotation: not a kernel
              _event("ProfilerStep", 50.0, annotation=True),
              _event("aten::mm", 0.0, cuda=False, cpu_us=7.0)]          # host op: not on the device
    kernels = script.device_kernels(events)
    assert [e.name for e in kernels] == ["nvjet_sm90_tst_256x128"] * 2 + ["triton_poi_fused_mul_3"]
    by_cat, by_name = script.time_by_category_and_name(kernels)
    assert by_cat == {"gemm": [22.0, 2], "fused elementwise (triton)": [2.5, 1]}
    assert by_name == {"nvjet_sm90_tst_256x128": [22.0, 2], "triton_poi_fused_mul_3": [2.5, 1]}
    # on CPU the aten ops are the kernels, timed by self CPU time
    cpu = script.device_kernels(events, on_gpu=False)
    assert script.time_by_category_and_name(cpu, on_gpu=False)[0] == {"gemm": [7.0, 1]}
