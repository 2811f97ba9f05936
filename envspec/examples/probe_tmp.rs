fn main() { let p = std::env::args().nth(1).unwrap(); match envspec::load(std::path::Path::new(&p)) { Ok(s) => println!("{:#?}", s.action), Err(e) => println!("{e}") } }
