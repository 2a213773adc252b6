// Standalone site operations: applies a SitePlan (see site_ops.cuh for the ops and their
// formulas) to an activation x [T, width] in place, for sites no fused kernel covers.
// One block per active row (grid = n_active); the block's threads cooperate on the row's ops
// in order (site_apply_active). f32 in and out.
#include "site_ops.cuh"

extern "C" __global__ void site_ops_f32(
    float* x,      // [T, width] in/out
    int width,
    SitePlan plan  // rows < T, slices within width (checked by the Rust wrapper)
) {
    if ((int)blockIdx.x >= plan.n_active) return;
    const int row = plan.active_rows[blockIdx.x];
    site_apply_active(plan, blockIdx.x, x + (long long)row * width, width);
}
