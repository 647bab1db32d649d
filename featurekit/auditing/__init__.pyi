from .run import Audit as Audit
from .run import audit as audit
from .run import audit_dir as audit_dir
from .settings import AuditSettings as AuditSettings
