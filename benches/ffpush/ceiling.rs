pub async fn run(_bench: &crate::Bench) {}
