//! Data sets generated exactly as their UCI documentation defines them (no download needed).
//!
//! - `balance_scale`: UCI Balance Scale (Siegler 1976; donated by Tim Hume). Every combination of
//!   left weight, left distance, right weight and right distance in 1..=5 (625 rows, in the UCI
//!   file's order: the last attribute varies fastest). The class is `L` when
//!   left-weight × left-distance exceeds right-weight × right-distance, `R` when it is smaller, `B`
//!   (balanced) when equal: 288 L, 49 B, 288 R. Classes are listed in UCI's order `L, B, R`.
//! - `tic_tac_toe`: UCI Tic-Tac-Toe Endgame (Aha 1991). Every board that can end a game where `x`
//!   moves first and play stops as soon as someone completes a line or the board is full: 958
//!   boards, `positive` (x has won, 626) or `negative` (o has won, 316, or a draw, 16). Rows are in
//!   the order of the board read as a base-3 number over the squares top-left ... bottom-right
//!   with digits b < o < x. The squares are encoded `b` (blank) = 0, `o` = 1, `x` = 2, the codes
//!   the CSV and ARFF loaders give these letters (sorted order; OpenML's nominal order), and
//!   the classes are `negative, positive`.

use super::select::{self, ColumnSelection};
use super::table::{ColumnEncoding, ColumnReport};
use super::{DataError, Dataset};

/// Names accepted by [`DataSource::Builtin`](super::DataSource::Builtin):
///
/// - `balance_scale`: UCI Balance Scale, all 625 combinations of left-weight, left-distance,
///   right-weight, right-distance in 1..=5 in the UCI file's order; classes `L, B, R`
///   (288, 49, 288) by comparing left-weight × left-distance with right-weight × right-distance.
/// - `tic_tac_toe`: UCI Tic-Tac-Toe Endgame, the 958 boards where a game that x starts ends;
///   nine features `top-left-square` ... `bottom-right-square` coded blank `b` = 0, `o` = 1,
///   `x` = 2; classes `negative, positive` (332, 626; positive = x has won).
pub const BUILTINS: &[&str] = &["balance_scale", "tic_tac_toe"];

pub(super) fn generate(name: &str) -> Result<Dataset, DataError> {
    match name {
        "balance_scale" => Ok(balance_scale()),
        "tic_tac_toe" => Ok(tic_tac_toe()),
        _ => Err(DataError::UnknownBuiltin { name: name.to_string() }),
    }
}

/// Keep the feature columns `selection` names, in its order (a builtin has no target column).
pub(super) fn select(data: Dataset, selection: &ColumnSelection) -> Result<Dataset, DataError> {
    if *selection == ColumnSelection::All {
        return Ok(data);
    }
    let selected = select::resolve(selection, &data.feature_names, None)
        .map_err(|p| DataError::InvalidBuiltin { name: data.name.clone(), message: select::describe(&p) })?;
    let keep = &selected.features;
    Ok(Dataset {
        feature_names: keep.iter().map(|&i| data.feature_names[i].clone()).collect(),
        x: data.x.iter().map(|row| keep.iter().map(|&i| row[i]).collect()).collect(),
        columns: keep.iter().map(|&i| data.columns[i].clone()).collect(),
        dropped: selected.dropped,
        ..data
    })
}

fn balance_scale() -> Dataset {
    let mut x = Vec::with_capacity(625);
    let mut y = Vec::with_capacity(625);
    for lw in 1..=5u32 {
        for ld in 1..=5u32 {
            for rw in 1..=5u32 {
                for rd in 1..=5u32 {
                    let (left, right) = (lw * ld, rw * rd);
                    y.push(match left.cmp(&right) {
                        std::cmp::Ordering::Greater => 0, // L
                        std::cmp::Ordering::Equal => 1,   // B
                        std::cmp::Ordering::Less => 2,    // R
                    });
                    x.push(vec![lw as f64, ld as f64, rw as f64, rd as f64]);
                }
            }
        }
    }
    let feature_names: Vec<String> =
        ["left-weight", "left-distance", "right-weight", "right-distance"].map(String::from).to_vec();
    Dataset {
        name: "balance_scale".to_string(),
        columns: feature_names.iter().map(|n| ColumnReport::numeric(n)).collect(),
        feature_names,
        class_names: ["L", "B", "R"].map(String::from).to_vec(),
        x,
        y,
        notes: vec!["generated: all 625 combinations of the four attributes in 1..=5 (UCI Balance Scale)".to_string()],
        dropped: Vec::new(),
    }
}

/// Square codes: blank, o, x (sorted order of the letters b < o < x).
const BLANK: u8 = 0;
const O: u8 = 1;
const X: u8 = 2;

const LINES: [[usize; 3]; 8] = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 4, 8], [2, 4, 6]];

fn wins(board: &[u8; 9], player: u8) -> bool {
    LINES.iter().any(|line| line.iter().all(|&square| board[square] == player))
}

/// Whether `board` is where a game (x first, stop at a win or a full board) can end, and if so
/// whether x won. A won board is reachable exactly when the winner made the last move (so x has
/// one mark more after an x win, as many as o after an o win) and the loser has no line: the
/// winner's last mark can be the one square all its lines share, since with at most five marks
/// two lines must intersect, and no earlier position had a line.
fn end_state(board: &[u8; 9]) -> Option<bool> {
    let xs = board.iter().filter(|&&s| s == X).count();
    let os = board.iter().filter(|&&s| s == O).count();
    let (x_won, o_won) = (wins(board, X), wins(board, O));
    match (x_won, o_won) {
        (true, false) if xs == os + 1 => Some(true),
        (false, true) if xs == os => Some(false),
        (false, false) if xs == 5 && os == 4 => Some(false),
        _ => None,
    }
}

fn tic_tac_toe() -> Dataset {
    let mut x = Vec::with_capacity(958);
    let mut y = Vec::with_capacity(958);
    for code in 0..3u32.pow(9) {
        let mut board = [BLANK; 9];
        let mut rest = code;
        for square in (0..9).rev() {
            board[square] = (rest % 3) as u8;
            rest /= 3;
        }
        if let Some(x_won) = end_state(&board) {
            x.push(board.iter().map(|&s| s as f64).collect());
            y.push(usize::from(x_won));
        }
    }
    let feature_names: Vec<String> = [
        "top-left-square",
        "top-middle-square",
        "top-right-square",
        "middle-left-square",
        "middle-middle-square",
        "middle-right-square",
        "bottom-left-square",
        "bottom-middle-square",
        "bottom-right-square",
    ]
    .map(String::from)
    .to_vec();
    // Blank, o, x: the codes BLANK, O and X.
    let squares = ColumnEncoding::Categorical { categories: ["b", "o", "x"].map(String::from).to_vec() };
    Dataset {
        name: "tic_tac_toe".to_string(),
        columns: feature_names
            .iter()
            .map(|n| ColumnReport { kind: squares.clone(), ..ColumnReport::numeric(n) })
            .collect(),
        feature_names,
        class_names: ["negative", "positive"].map(String::from).to_vec(),
        x,
        y,
        notes: vec!["generated: all 958 legal end boards (UCI Tic-Tac-Toe Endgame); positive = x won".to_string()],
        dropped: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_scale_has_the_uci_counts_and_order() {
        let d = generate("balance_scale").unwrap();
        assert_eq!(d.x.len(), 625);
        assert_eq!(d.class_counts(), vec![288, 49, 288]);
        // The UCI file starts "B,1,1,1,1", "R,1,1,1,2" and ends "L,5,5,5,4", "B,5,5,5,5".
        assert_eq!((d.x[0].clone(), d.y[0]), (vec![1.0, 1.0, 1.0, 1.0], 1));
        assert_eq!((d.x[1].clone(), d.y[1]), (vec![1.0, 1.0, 1.0, 2.0], 2));
        assert_eq!((d.x[623].clone(), d.y[623]), (vec![5.0, 5.0, 5.0, 4.0], 0));
        assert_eq!((d.x[624].clone(), d.y[624]), (vec![5.0, 5.0, 5.0, 5.0], 1));
        assert_eq!(d.feature_names.len(), 4);
    }

    #[test]
    fn tic_tac_toe_has_the_uci_counts() {
        let d = generate("tic_tac_toe").unwrap();
        assert_eq!(d.x.len(), 958);
        assert_eq!(d.class_counts(), vec![332, 626]);
        assert_eq!(d.feature_names.len(), 9);
        // Among the negatives: 16 draws (full boards) and 316 o wins.
        let full = |r: &Vec<f64>| r.iter().all(|&s| s != 0.0);
        let draws = d.x.iter().zip(&d.y).filter(|(r, &c)| c == 0 && full(r)).count();
        assert_eq!(draws, 16);
    }

    #[test]
    fn end_states_follow_the_rules() {
        let b = |s: &str| -> [u8; 9] {
            let mut board = [BLANK; 9];
            for (i, ch) in s.chars().enumerate() {
                board[i] = match ch {
                    'x' => X,
                    'o' => O,
                    _ => BLANK,
                };
            }
            board
        };
        // The first row of the UCI file: x wins on the top row... and the left column.
        assert_eq!(end_state(&b("xxxxooxoo")), Some(true));
        assert_eq!(end_state(&b("xxxoo....")), Some(true));
        // o wins with three marks against three.
        assert_eq!(end_state(&b("ooox.xx..")), Some(false));
        // A draw.
        assert_eq!(end_state(&b("xoxxoooxx")), Some(false));
        // Not over, or unreachable: game in progress; x won but o moved after; both won.
        assert_eq!(end_state(&b("xo.......")), None);
        assert_eq!(end_state(&b("xxxoo.o..")), None);
        assert_eq!(end_state(&b("xxxooo...")), None);
    }

    #[test]
    fn a_selection_picks_and_orders_the_features() {
        let d = select(
            generate("balance_scale").unwrap(),
            &ColumnSelection::Features(vec!["right-distance".into(), "left-weight".into()]),
        )
        .unwrap();
        assert_eq!(d.feature_names, vec!["right-distance", "left-weight"]);
        assert_eq!(d.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), d.feature_names);
        assert_eq!(d.x[1], vec![2.0, 1.0]);
        assert_eq!(d.dropped.len(), 2);
        let d =
            select(generate("tic_tac_toe").unwrap(), &ColumnSelection::Drop(vec!["top-left-square".into()])).unwrap();
        assert_eq!(d.feature_names.len(), 8);
        assert_eq!(d.columns[0].to_string(), "`top-middle-square`: categorical, 3 codes (b=0, o=1, x=2)");
        let err =
            select(generate("balance_scale").unwrap(), &ColumnSelection::Drop(vec!["left-wieght".into()])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "builtin data set `balance_scale`: error: unknown column `left-wieght` in `dataset.drop`; the columns are: left-weight, left-distance, right-weight, right-distance (did you mean `left-weight`?)"
        );
    }

    #[test]
    fn unknown_builtin_names_the_known_ones() {
        let err = generate("iris").unwrap_err();
        assert_eq!(err.to_string(), "unknown builtin data set `iris`; expected one of: balance_scale, tic_tac_toe");
    }
}
