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
