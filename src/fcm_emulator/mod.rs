//! Placeholder until the emulator lands.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
pub struct EmulatorOptions {
    pub token_lifetime: Duration,
}
impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3600),
        }
    }
}
pub struct FcmEmulator;
impl FcmEmulator {
    pub async fn start(_addr: SocketAddr, _o: EmulatorOptions) -> std::io::Result<FcmEmulator> {
        Ok(FcmEmulator)
    }
    pub fn url(&self) -> String {
        String::new()
    }
    pub fn write_service_account(&self, _p: &Path, _project: &str) -> std::io::Result<()> {
        Ok(())
    }
    pub fn shutdown(&self) {}
}
