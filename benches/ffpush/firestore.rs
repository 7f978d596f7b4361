pub async fn latency(_bench: &crate::Bench) {}
pub async fn broadcast(_bench: &crate::Bench) {}
pub async fn rss(_bench: &crate::Bench) {}
