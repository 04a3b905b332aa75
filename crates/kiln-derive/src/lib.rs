//! `#[derive(Module)]`: writes the visitor over a struct's named parameters, buffers and
//! sub-modules, so that `named_parameters`, `state_dict`, `freeze` etc. come for free.
//!
//! Every field must implement `kiln_nn::Visit` (parameters, buffers, modules, and `Vec`,
//! `Option` and `Box` of those do) unless marked `#[module(skip)]` (plain configuration such as
//! `eps: f64`). A field's name is its Rust name, or the one given by `#[module(rename = "...")]`
//! so that names line up with checkpoint keys.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use proc_macro_crate::{crate_name, FoundCrate};
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields, LitStr};

/// Derives `kiln_nn::Module` for a struct (see the crate docs).
#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn nn_path() -> TokenStream2 {
    match crate_name("kiln-nn") {
        Ok(FoundCrate::Itself) => quote!(crate),
        Ok(FoundCrate::Name(name)) => {
            let ident = syn::Ident::new(&name, proc_macro2::Span::call_site());
            quote!(::#ident)
        }
        Err(_) => match crate_name("kiln") {
            Ok(FoundCrate::Name(name)) => {
                let ident = syn::Ident::new(&name, proc_macro2::Span::call_site());
                quote!(::#ident::nn)
            }
            _ => quote!(::kiln::nn),
        },
    }
}

struct FieldAttrs {
    skip: bool,
    rename: Option<String>,
}

fn field_attrs(field: &syn::Field) -> syn::Result<FieldAttrs> {
    let mut attrs = FieldAttrs {
        skip: false,
        rename: None,
    };
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("module")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("skip") {
                attrs.skip = true;
                Ok(())
            } else if meta.path.is_ident("rename") {
                let lit: LitStr = meta.value()?.parse()?;
                attrs.rename = Some(lit.value());
                Ok(())
            } else {
                Err(meta.error("expected `skip` or `rename = \"name\"`"))
            }
        })?;
    }
    Ok(attrs)
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let nn = nn_path();
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            name,
            "#[derive(Module)] supports structs only",
        ));
    };
    let mut visits = Vec::new();
    match &data.fields {
        Fields::Named(fields) => {
            for field in &fields.named {
                let attrs = field_attrs(field)?;
                if attrs.skip {
                    continue;
                }
                let ident = field.ident.as_ref().expect("named field");
                let key = attrs
                    .rename
                    .unwrap_or_else(|| ident.to_string().trim_start_matches("r#").to_string());
                visits.push(quote! { #nn::Visit::visit_named(&self.#ident, #key, visitor); });
            }
        }
        Fields::Unnamed(fields) => {
            for (i, field) in fields.unnamed.iter().enumerate() {
                let attrs = field_attrs(field)?;
                if attrs.skip {
                    continue;
                }
                let index = syn::Index::from(i);
                let key = attrs.rename.unwrap_or_else(|| i.to_string());
                visits.push(quote! { #nn::Visit::visit_named(&self.#index, #key, visitor); });
            }
        }
        Fields::Unit => {}
    }
    Ok(quote! {
        impl #impl_generics #nn::Module for #name #ty_generics #where_clause {
            fn visit(&self, visitor: &mut #nn::Visitor) {
                #(#visits)*
            }
        }
    })
}
