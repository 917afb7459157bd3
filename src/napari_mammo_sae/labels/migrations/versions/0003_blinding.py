"""Identity and blinding enforced by PostgreSQL (nothing to do on SQLite, a one-reader file).

Row-level security on ``verdicts`` for every role but the owner (the study coordinator, who reads
everything):

- INSERT only rows whose ``rater`` is the connected role, and, in a study, only if that role is
  one of the study's readers;
- SELECT one's own rows, and others' rows on a (study, SAE, neuron) only once one has a verdict of
  one's own there (blinding). The check runs in a SECURITY DEFINER function because a policy on
  ``verdicts`` cannot query ``verdicts`` itself under RLS (infinite recursion);
- no UPDATE or DELETE policy and no such privilege: append-only.

Readers get their privileges when a study adds them (``study.create_study``).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # row-level security is a server feature; a local file has one reader
    op.execute("REVOKE ALL ON verdicts, studies, study_readers, study_neurons FROM PUBLIC")
    op.execute(
        """
        CREATE FUNCTION mammo_has_own_verdict(p_study text, p_sae text, p_neuron integer,
                                              p_reader text)
        RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT EXISTS (SELECT 1 FROM verdicts v WHERE v.study = p_study
                           AND v.sae_hash = p_sae AND v.neuron = p_neuron AND v.rater = p_reader)
        $$
        """
    )
    op.execute(
        "REVOKE ALL ON FUNCTION mammo_has_own_verdict(text, text, integer, text) FROM PUBLIC"
    )
    op.execute("ALTER TABLE verdicts ENABLE ROW LEVEL SECURITY")
    op.execute(
        """
        CREATE POLICY own_name_only ON verdicts FOR INSERT
        WITH CHECK (rater = current_user AND (study = '' OR EXISTS (
            SELECT 1 FROM study_readers r WHERE r.study = verdicts.study AND r.reader = current_user)))
        """
    )
    op.execute(
        """
        CREATE POLICY blinded_read ON verdicts FOR SELECT
        USING (rater = current_user
               OR mammo_has_own_verdict(study, sae_hash, neuron, current_user::text))
        """
    )
