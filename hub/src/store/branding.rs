//! Per-org white-label brands (`branding` tree): the brand as JSON under the org id, its
//! logo's bytes under `org\0logo`, both written in one transaction. An org without a
//! record shows the hub's own theme. Validation is the caller's (`crate::branding`).

use super::{decode, encode, Error, Store};
use serde::{Deserialize, Serialize};

/// An org's brand as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBrand {
    pub product_name: String,
    /// `#rrggbb`.
    pub accent: String,
    /// `#rrggbb`.
    pub header_background: String,
    /// Media type of the logo, if the brand has one (its bytes are kept beside).
    pub logo_content_type: Option<String>,
    /// Changes with every write; pages link `?v=` it so browsers fetch the new brand.
    pub updated_at_ms: i64,
    pub updated_by: String,
}

const TREE: &str = "branding";

fn logo_key(org: &str) -> Vec<u8> {
    let mut key = org.as_bytes().to_vec();
    key.extend_from_slice(b"\0logo");
    key
}

impl Store {
    /// The org's brand, if one was set.
    pub fn branding(&self, org: &str) -> Result<Option<StoredBrand>, Error> {
        let tree = self.db.open_tree(TREE)?;
        tree.get(org.as_bytes())?.map(|v| decode("branding", &v)).transpose()
    }

    /// The org's logo bytes, if its brand has a logo.
    pub fn branding_logo(&self, org: &str) -> Result<Option<Vec<u8>>, Error> {
        let tree = self.db.open_tree(TREE)?;
        Ok(tree.get(logo_key(org))?.map(|v| v.to_vec()))
    }

    /// Replace the org's brand and logo (`None` removes the logo), durably and together.
    pub fn put_branding(&self, org: &str, brand: &StoredBrand, logo: Option<&[u8]>) -> Result<(), Error> {
        let _writing = self.writing();
        let tree = self.db.open_tree(TREE)?;
        let value = encode(brand);
        tree.transaction(|tx| {
            tx.insert(org.as_bytes(), value.as_slice())?;
            match logo {
                Some(bytes) => tx.insert(logo_key(org), bytes)?,
                None => tx.remove(logo_key(org))?,
            };
            Ok(())
        })
        .map_err(|e: sled::transaction::TransactionError<()>| match e {
            sled::transaction::TransactionError::Storage(e) => Error::Sled(e),
            sled::transaction::TransactionError::Abort(()) => Error::Conflict("branding write aborted".to_string()),
        })?;
        self.durable()?;
        Ok(())
    }

    /// Forget the org's brand: its pages show the hub's theme again.
    pub fn delete_branding(&self, org: &str) -> Result<bool, Error> {
        let _writing = self.writing();
        let tree = self.db.open_tree(TREE)?;
        let existed = tree.remove(org.as_bytes())?.is_some();
        tree.remove(logo_key(org))?;
        self.durable()?;
        Ok(existed)
    }
}
