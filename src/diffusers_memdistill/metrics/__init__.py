"""Quality and memorization metrics, as functions of tensors and feature tensors.

Feature extractors (SSCD, Inception, CLIP) are injectable callables; their loaders raise
[`MissingWeightsError`] with instructions when weights are unavailable, so other metrics can still be computed.
Figures live in ``diffusers_memdistill.metrics.figures`` (imported on demand, it loads matplotlib).
"""

from ._images import quantize_uint8
from .clip_score import CLIPFeatureExtractor, clip_score, compute_clip_score, resolve_open_clip_weights
from .fid import (
    FID_INCEPTION_URL,
    FeatureStats,
    InceptionFeatureExtractor,
    cached_feature_stats,
    feature_statistics,
    fid_from_features,
    fid_helper_weights_path,
    frechet_distance,
    load_feature_stats,
    save_feature_stats,
    tensor_content_hash,
)
from .memorization import (
    GroupStats,
    NearDuplicateResult,
    OwnImageMemorizationResult,
    PixelMemorizationResult,
    SimilarityMemorizationResult,
    as_unit_range_images,
    memorization_ratio,
    pixel_memorization,
    pixel_memorization_from_neighbours,
    pixel_near_duplicates,
    pixel_own_image_memorization,
    sscd_memorization,
    sscd_memorization_from_neighbours,
    sscd_near_duplicates,
    summarize_scores,
)
from .nn_search import KNNResult, knn_search, unique_rows
from .pairing import (
    CopyingDiagnostics,
    PairingResult,
    copying_diagnostics,
    pairing_inefficiency,
    squared_distance_matrix,
)
from .sscd import (
    SSCD_DISC_MIXUP_URL,
    SSCD_PREPROCESSINGS,
    SSCDFeatureExtractor,
    SSCDOnnxFeatureExtractor,
    sscd_preprocess,
    sscd_resize,
)
from .weights import MissingWeightsError, WeightsProvenance, resolve_weights_file

__all__ = [
    "CLIPFeatureExtractor",
    "CopyingDiagnostics",
    "FID_INCEPTION_URL",
    "FeatureStats",
    "GroupStats",
    "InceptionFeatureExtractor",
    "KNNResult",
    "MissingWeightsError",
    "NearDuplicateResult",
    "OwnImageMemorizationResult",
    "PairingResult",
    "PixelMemorizationResult",
    "SSCDFeatureExtractor",
    "SSCDOnnxFeatureExtractor",
    "SSCD_DISC_MIXUP_URL",
    "SSCD_PREPROCESSINGS",
    "SimilarityMemorizationResult",
    "WeightsProvenance",
    "as_unit_range_images",
    "cached_feature_stats",
    "clip_score",
    "compute_clip_score",
    "copying_diagnostics",
    "feature_statistics",
    "fid_from_features",
    "fid_helper_weights_path",
    "frechet_distance",
    "knn_search",
    "load_feature_stats",
    "memorization_ratio",
    "pairing_inefficiency",
    "pixel_memorization",
    "pixel_memorization_from_neighbours",
    "pixel_near_duplicates",
    "pixel_own_image_memorization",
    "quantize_uint8",
    "resolve_open_clip_weights",
    "resolve_weights_file",
    "save_feature_stats",
    "squared_distance_matrix",
    "sscd_memorization",
    "sscd_memorization_from_neighbours",
    "sscd_near_duplicates",
    "sscd_preprocess",
    "sscd_resize",
    "summarize_scores",
    "tensor_content_hash",
    "unique_rows",
]
