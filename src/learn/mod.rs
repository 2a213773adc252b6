//! Linear probes: multinomial logistic regression and ridge regression (the models and
//! objectives of scikit-learn's LogisticRegression and Ridge), seeded splits, metrics; steering
//! directions (class means, context averages, unique effects, projectors).

pub mod directions;
pub mod linalg;
pub mod logreg;
pub mod metrics;
pub mod penalty;
pub mod ridge;
pub mod split;
