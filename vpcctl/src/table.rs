//! Output in virsh's table shape.

/// virsh's table shape: a header, a rule, left-aligned columns.
pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            s.push(' ');
            s.push_str(&format!("{cell:<w$}  ", w = w));
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    println!(
        "{}",
        "-".repeat(widths.iter().map(|w| w + 3).sum::<usize>().max(4))
    );
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    println!();
}

/// Prints the outcome of a verb: a line of text, or `{"result": ...}` with --json.
pub fn said(json: bool, what: &str) {
    if json {
        println!("{}", serde_json::json!({ "result": what }));
    } else {
        println!("{what}\n");
    }
}
