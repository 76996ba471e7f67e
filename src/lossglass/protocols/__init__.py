"""The four protocols, one file per question: walk (how far can a walker wander), connect (are minima
joined), replicas (do solutions form a Parisi tree), curvature (are minima flat, and does it matter)."""
