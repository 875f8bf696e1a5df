"""Methods under comparison, behind one seam (``Method``): plain, JRT, soft prompt, GPC, ProSG, oracle."""

from prosg.methods.base import Method, MethodOutput, Plain
from prosg.methods.gpc import GlobalPromptCell
from prosg.methods.jrt import JRT, repeat_prompt
from prosg.methods.sg import Oracle, ProSG
from prosg.methods.soft_prompt import SoftPrompt

__all__ = ["Method", "MethodOutput", "Plain", "JRT", "SoftPrompt", "GlobalPromptCell", "ProSG", "Oracle", "repeat_prompt"]
