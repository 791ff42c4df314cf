//! Typed D-Bus errors: `org.vpcd.Error.<Kind>` with a message that names the object.

use crate::error::Error;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.vpcd.Error")]
pub enum ApiError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    InvalidState(String),
    Unavailable(String),
    Timeout(String),
    Failed(String),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => ApiError::InvalidArgument(msg),
            Error::NotFound(_) => ApiError::NotFound(msg),
            Error::AlreadyExists(_) => ApiError::AlreadyExists(msg),
            Error::InvalidState(_) => ApiError::InvalidState(msg),
            Error::Unavailable(_) => ApiError::Unavailable(msg),
            Error::Timeout(_) => ApiError::Timeout(msg),
            Error::Failed(_) => ApiError::Failed(msg),
        }
    }
}
