//! White-label brands: the operator theme (config, the hub's own look) and each org's brand
//! (store, set through `GET/PUT /api/v1/orgs/{org}/branding`), turned into the dashboard's
//! [`Brand`] for a page.
//!
//! Colours reach pages through served stylesheets (`/assets/theme.css`,
//! `/assets/brand/{org}.css`) and logos through served images, because the hub's Content
//! Security Policy (`default-src 'self'`) allows neither inline styles nor images from
//! elsewhere. This module validates and converts; it routes nothing.

use crate::auth::Principal;
use crate::store::{self, StoredBrand};
use crate::Hub;
use gantry_dashboards::layout::{self, Brand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest logo accepted, in bytes (decoded).
pub const MAX_LOGO_BYTES: usize = 64 * 1024;

/// Where the hub serves the operator theme's logo.
pub const THEME_LOGO_PATH: &str = "/assets/theme/logo";

/// The operator theme: how the hub's dashboard looks to operators, on the login page, and
/// to every org without a brand of its own (config table `[theme]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThemeConfig {
    /// Name in the header and page titles (default `Gantry`).
    pub product_name: String,
    /// Accent colour of links, buttons, focus rings and charts, `#rrggbb` or `#rgb`.
    pub accent: String,
    /// Background of the header bar, `#rrggbb` or `#rgb`; its text is black or white,
    /// whichever contrasts more.
    pub header_background: String,
    /// A PNG, JPEG, WebP or SVG logo file shown beside the product name (at most 64 KiB).
    pub logo_file: Option<PathBuf>,
}

impl Default for ThemeConfig {
    fn default() -> Self {
        ThemeConfig {
            product_name: layout::DEFAULT_PRODUCT_NAME.to_string(),
            accent: layout::DEFAULT_ACCENT.to_string(),
            header_background: layout::DEFAULT_HEADER_BACKGROUND.to_string(),
            logo_file: None,
        }
    }
}

impl ThemeConfig {
    /// Every problem, each naming its `theme.` field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = layout::validate_product_name(&self.product_name) {
            errors.push(format!("theme.{e}"));
        }
        if let Err(e) = layout::parse_hex_colour(&self.accent) {
            errors.push(format!("theme.accent: {e}"));
        }
        if let Err(e) = layout::parse_hex_colour(&self.header_background) {
            errors.push(format!("theme.header_background: {e}"));
        }
        if let Some(path) = &self.logo_file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    if let Err(e) = logo_content_type(path.extension().and_then(|e| e.to_str()).unwrap_or(""), &bytes) {
                        errors.push(format!("theme.logo_file {}: {e}", path.display()));
                    }
                }
                Err(e) => errors.push(format!("theme.logo_file {}: {e}", path.display())),
            }
        }
        errors
    }

    /// The operator theme as the dashboard's brand.
    pub fn brand(&self) -> Brand {
        Brand {
            product_name: self.product_name.clone(),
            logo_url: self.logo_file.as_ref().map(|_| THEME_LOGO_PATH.to_string()),
            accent: self.accent.clone(),
            header_background: self.header_background.clone(),
            stylesheet: layout::THEME_PATH.to_string(),
        }
    }
}

/// `PUT /api/v1/orgs/{org}/branding`: the whole brand (a PUT replaces it; send the logo
/// again to keep it).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrandingRequest {
    /// 1-60 characters.
    pub product_name: String,
    /// `#rrggbb` or `#rgb`.
    pub accent: String,
    /// `#rrggbb` or `#rgb`; defaults to white.
    #[serde(default)]
    pub header_background: Option<String>,
    /// A `data:` URL of a PNG, JPEG, WebP or SVG image of at most 64 KiB
    /// (`data:image/png;base64,...`); absent means no logo.
    #[serde(default)]
    pub logo: Option<String>,
}

/// A validated brand ready to store: the record and the logo's bytes.
#[derive(Debug)]
pub struct ValidBrand {
    pub stored: StoredBrand,
    pub logo: Option<Vec<u8>>,
}

/// Check a request; the message names the field at fault.
pub fn validate(request: &BrandingRequest, by: &str, now_ms: i64) -> Result<ValidBrand, String> {
    layout::validate_product_name(&request.product_name)?;
    let colour = |field: &str, text: &str| layout::parse_hex_colour(text).map(hex).map_err(|e| format!("{field}: {e}"));
    let accent = colour("accent", &request.accent)?;
    let header_background = colour("header_background", request.header_background.as_deref().unwrap_or(layout::DEFAULT_HEADER_BACKGROUND))?;
    let logo = request.logo.as_deref().map(decode_logo).transpose().map_err(|e| format!("logo: {e}"))?;
    Ok(ValidBrand {
        stored: StoredBrand {
            product_name: request.product_name.trim().to_string(),
            accent,
            header_background,
            logo_content_type: logo.as_ref().map(|(content_type, _)| content_type.to_string()),
            updated_at_ms: now_ms,
            updated_by: by.to_string(),
        },
        logo: logo.map(|(_, bytes)| bytes),
    })
}

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// Decode a `data:image/...;base64,` URL into its media type and bytes.
fn decode_logo(url: &str) -> Result<(&'static str, Vec<u8>), String> {
    let rest = url.strip_prefix("data:").ok_or("must be a data: URL like data:image/png;base64,...")?;
    let (meta, data) = rest.split_once(',').ok_or("data: URL has no comma")?;
    let kind = meta.strip_suffix(";base64").ok_or("data: URL must be base64 (;base64,)")?;
    let extension = match kind {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/svg+xml" => "svg",
        other => return Err(format!("{other:?} is not one of image/png, image/jpeg, image/webp, image/svg+xml")),
    };
    if data.len() > MAX_LOGO_BYTES * 4 / 3 + 4 {
        return Err(format!("is larger than {} KiB", MAX_LOGO_BYTES / 1024));
    }
    let bytes = data_encoding::BASE64.decode(data.as_bytes()).map_err(|e| format!("base64: {e}"))?;
    let content_type = logo_content_type(extension, &bytes)?;
    Ok((content_type, bytes))
}

/// The media type of a logo by its kind (file extension), checked against its bytes.
pub fn logo_content_type(extension: &str, bytes: &[u8]) -> Result<&'static str, String> {
    if bytes.len() > MAX_LOGO_BYTES {
        return Err(format!("is larger than {} KiB", MAX_LOGO_BYTES / 1024));
    }
    let (content_type, ok) = match extension.to_ascii_lowercase().as_str() {
        "png" => ("image/png", bytes.starts_with(b"\x89PNG\r\n\x1a\n")),
        "jpg" | "jpeg" => ("image/jpeg", bytes.starts_with(&[0xff, 0xd8, 0xff])),
        "webp" => ("image/webp", bytes.len() > 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP"),
        "svg" => {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).trim_start().to_string();
            ("image/svg+xml", text.starts_with("<svg") || text.starts_with("<?xml"))
        }
        _ => return Err("must be a .png, .jpg, .webp or .svg image".to_string()),
    };
    if ok {
        Ok(content_type)
    } else {
        Err(format!("is not a {content_type} image"))
    }
}

/// The stored brand of `org` as the dashboard's brand, linking its served stylesheet and
/// logo with the version that busts caches.
pub fn org_brand(org: &str, stored: &StoredBrand) -> Brand {
    let version = stored.updated_at_ms;
    let org_path = layout::query_escape(org);
    Brand {
        product_name: stored.product_name.clone(),
        logo_url: stored.logo_content_type.as_ref().map(|_| format!("/assets/brand/{org_path}/logo?v={version}")),
        accent: stored.accent.clone(),
        header_background: stored.header_background.clone(),
        stylesheet: format!("/assets/brand/{org_path}.css?v={version}"),
    }
}

/// The brand a page shows: operators always see the operator theme; members see the brand
/// of the org the page is about, or of their one org, or the operator theme.
pub fn brand_for(hub: &Hub, principal: &Principal, org: Option<&str>) -> Result<Brand, store::Error> {
    let theme = || hub.config.theme.brand();
    if principal.operator {
        return Ok(theme());
    }
    let org = match org {
        Some(org) => Some(org.to_string()),
        None if principal.access.orgs.len() == 1 => principal.access.orgs.keys().next().cloned(),
        None => None,
    };
    let Some(org) = org.filter(|o| principal.access.knows(o)) else { return Ok(theme()) };
    Ok(match hub.store.branding(&org)? {
        Some(stored) => org_brand(&org, &stored),
        None => theme(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(logo: Option<&str>) -> BrandingRequest {
        BrandingRequest { product_name: "Acme Cloud".into(), accent: "#C0FFEE".into(), header_background: None, logo: logo.map(str::to_string) }
    }

    #[test]
    fn valid_brands_are_normalised() {
        let png = format!("data:image/png;base64,{}", data_encoding::BASE64.encode(b"\x89PNG\r\n\x1a\n0000"));
        let brand = validate(&request(Some(&png)), "ana", 5).unwrap();
        assert_eq!(brand.stored.accent, "#c0ffee");
        assert_eq!(brand.stored.header_background, "#ffffff");
        assert_eq!(brand.stored.logo_content_type.as_deref(), Some("image/png"));
        assert_eq!(org_brand("acme", &brand.stored).stylesheet, "/assets/brand/acme.css?v=5");
    }

    #[test]
    fn bad_brands_name_the_field() {
        let bad = BrandingRequest { accent: "blue".into(), ..request(None) };
        assert!(validate(&bad, "ana", 0).unwrap_err().starts_with("accent"));
        let not_png = format!("data:image/png;base64,{}", data_encoding::BASE64.encode(b"<svg onload=x>"));
        assert!(validate(&request(Some(&not_png)), "ana", 0).unwrap_err().contains("not a image/png"));
        assert!(validate(&request(Some("https://example.com/logo.png")), "ana", 0).unwrap_err().starts_with("logo"));
        assert!(validate(&request(Some("data:text/html;base64,PGI+")), "ana", 0).is_err());
        let huge = format!("data:image/png;base64,{}", data_encoding::BASE64.encode(&vec![0u8; MAX_LOGO_BYTES + 1]));
        assert!(validate(&request(Some(&huge)), "ana", 0).unwrap_err().contains("64 KiB"));
    }

    #[test]
    fn theme_config_is_checked() {
        assert!(ThemeConfig::default().validate().is_empty());
        let bad = ThemeConfig { accent: "#12".into(), logo_file: Some("/nonexistent/logo.png".into()), ..ThemeConfig::default() };
        let errors = bad.validate();
        assert!(errors.iter().any(|e| e.starts_with("theme.accent")) && errors.iter().any(|e| e.starts_with("theme.logo_file")), "{errors:?}");
    }
}
